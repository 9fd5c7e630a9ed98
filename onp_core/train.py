"""Training of clean or backdoored subjects (the models defenses are tested on).

SGD + Nesterov with a one-cycle learning rate gets a small CNN to useful accuracy in
a handful of epochs, which is what lets CI train its own subjects on two CPU cores.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attacks.base import Attack
from .data.augment import augment
from .data.dataset import ImageSet
from .device import resolve_device

EpochCallback = Callable[[int, int, dict[str, float]], None]


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    crop_padding: int = 4
    hflip: bool = True
    seed: int = 0
    device: str = "auto"
    channels_last: bool = False
    bf16: bool = False


def train_model(model: nn.Module, data: ImageSet, config: TrainConfig, attack: Attack | None = None,
                on_epoch: EpochCallback | None = None) -> nn.Module:
    """Train ``model`` in place on ``data`` (already poisoned if a backdoor is wanted).

    ``attack`` is used only for attacks that alter batches during training (WaNet's
    noise mode); plain poisoning happens beforehand in the data set.
    """
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                          weight_decay=config.weight_decay)
    steps_per_epoch = (len(data) + config.batch_size - 1) // config.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch,
                                                pct_start=0.25)
    use_bf16 = config.bf16 and (device.type == "cuda" or torch.backends.mkldnn.is_available())
    deferred = data.meta.get("poisoned") if data.meta.get("deferred_trigger") else None
    for epoch in range(config.epochs):
        model.train()
        t0, seen, correct, loss_sum = time.time(), 0, 0, 0.0
        order = torch.randperm(len(data), generator=g)
        for i in range(0, len(data), config.batch_size):
            idx = order[i:i + config.batch_size]
            x = data.images[idx].float().div_(255.0)
            y = data.labels[idx]
            if attack is not None:
                x, y = attack.training_noise(x, y)
            x = augment(x, config.crop_padding, config.hflip, g)
            if attack is not None and deferred is not None:
                rows = deferred[idx]
                if bool(rows.any()):
                    x[rows] = attack.apply(x[rows])
            x = x.to(device)
            y = y.to(device)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(x)
                loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            correct += int((out.argmax(1) == y).sum())
        if on_epoch:
            on_epoch(epoch + 1, config.epochs, {"loss": loss_sum / seen, "train_acc": correct / seen,
                                                "seconds": time.time() - t0})
    model.eval()
    return model.to("cpu").to(memory_format=torch.contiguous_format)
