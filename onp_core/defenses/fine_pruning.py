"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune dormant channels, then fine-tune.

1. **activations** — the mean activation of each channel of the LAST conv neuron layer (its BN,
   or the conv itself without BN; hidden linear units after it are left alone, as in the paper,
   unless the model has no conv layer) over the clean search split,
   measured where the next layer reads it (after the ReLU; after the residual add and ReLU in
   post-activation ResNets);
2. **prune** — channels are pruned in order of increasing mean activation (backdoor channels
   are dormant on clean inputs), ``prune_step`` at a time, while the clean accuracy stays within
   ``max_acc_drop`` (default 5 points) of the unpruned model's and at most ``max_fraction``
   (default 80 %) of the layer is pruned; the last step within the tolerance is kept. The
   accuracy is measured on all the clean data (search + held-out split — pruning trains nothing,
   and 100 held-out images alone give ±4-point noise). The tolerance is a fixed default chosen
   without poisoned data: the paper stops once validation accuracy has fallen by a few points
   (BackdoorBench: 10 % relative);
3. **fine-tune** — the whole pruned model is trained on the clean search split (SGD lr 0.01,
   momentum 0.9, weight decay 5e-4, batch 128, ``finetune_epochs`` epochs, random crop
   augmentation) with the pruned channels re-zeroed after every step so they stay pruned.

If the last layer is tied to others by residual adds (post-activation ResNets), a channel is
pruned in every layer of that group, i.e. the channel of the residual stream the classifier
reads is removed.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..data.dataset import ImageSet
from ..device import resolve_device
from ..models import ImageClassifier
from ..neurons import discover_neurons, prune
from .base import DefenseConfig, ProgressCallback, RepairResult, Timer, clean_splits, report, working_copy
from .common import (FinetuneSettings, LayerProbe, Tensors, accuracy_of, by_name, crop_padding,
                     finetune_keeping_pruned, mean_activation)

NAME = "fp"


class Config(DefenseConfig):
    """Fine-Pruning hyper-parameters."""

    max_acc_drop: float = Field(0.05, ge=0, le=1, description="stop pruning before clean accuracy falls more than "
                                                              "this (absolute) below the unpruned model's")
    max_fraction: float = Field(0.8, gt=0, le=1, description="prune at most this share of the last layer")
    prune_step: int | None = Field(None, ge=1, description="channels pruned per step (default: size/128, ≥1)")
    finetune_epochs: int = Field(10, ge=0, description="fine-tuning epochs over the clean search split")
    lr: float = Field(0.01, gt=0, description="fine-tuning SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="fine-tuning SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="fine-tuning weight decay")
    batch_size: int = Field(128, ge=1, description="fine-tuning batch size")
    augment: bool = Field(True, description="random-crop augmentation during fine-tuning")
    hflip: bool = Field(False, description="also random horizontal flips during fine-tuning")


def repair(model: ImageClassifier, clean: ImageSet, config: Config, progress: ProgressCallback | None = None
           ) -> RepairResult:
    """Prune the last layer's least-active channels within the accuracy tolerance, then fine-tune."""
    timer = Timer()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    search, held = clean_splits(clean, config)
    input_shape = model.manifest.input_shape
    # activations and the pruning what-ifs run on the traced graph, on the CPU (a traced graph
    # keeps the buffers it was traced with); the fine-tuning runs on ``device``
    net = working_copy(model).cpu()
    neurons = discover_neurons(net, input_shape)
    cpu = torch.device("cpu")
    search_c, held_c = Tensors.of(search, cpu), Tensors.of(held, cpu)
    all_c = Tensors(torch.cat([search_c.x, held_c.x]), torch.cat([search_c.y, held_c.y]))
    trace: list[dict[str, Any]] = []

    # 1. mean activations of the last conv layer on clean data (the last hidden layer of a model without one)
    spatial = [li for li, layer in enumerate(neurons.layers) if layer.spatial]
    last = spatial[-1] if spatial else len(neurons.layers) - 1
    layer = neurons.layers[last]
    group = neurons.groups.get(layer.group, [last]) if layer.group >= 0 else [last]
    report(progress, 0, 1, "activations", layer=layer.name)
    act = mean_activation(net, neurons, last, search_c, input_shape)
    order = torch.argsort(act, stable=True).tolist()

    # 2. prune by increasing activation while the clean accuracy holds
    acc_before = accuracy_of(net, held_c)
    probe = LayerProbe(net, neurons, last, all_c, input_shape)
    base = probe.accuracy([])
    step = config.prune_step or max(1, layer.size // 128)
    limit = int(config.max_fraction * layer.size)
    kept_k, k = 0, 0
    total_steps = (limit + step - 1) // step
    trace.append({"phase": "prune", "num_pruned": 0, "acc": base})
    while k < limit:
        k_next = min(limit, k + step)
        acc = probe.accuracy(order[:k_next])
        trace.append({"phase": "prune", "num_pruned": k_next, "acc": acc, "activation": float(act[order[k_next - 1]])})
        report(progress, (k_next + step - 1) // step, total_steps, "prune", num_pruned=k_next, acc=acc)
        if acc < base - config.max_acc_drop:
            break
        kept_k = k = k_next
    del probe
    channels = sorted(order[:kept_k])
    pruned = {li: channels for li in group} if channels else {}

    # restart from the original weights with only the accepted channels pruned
    net = working_copy(model).to(device)
    prune(net, neurons, pruned)
    search_t, held_t = Tensors.of(search, device), Tensors.of(held, device)
    acc_pruned = accuracy_of(net, held_t)

    # 3. fine-tune, keeping the pruned channels at zero
    finetune_undone = None
    if config.finetune_epochs > 0:
        finetune_undone = finetune_keeping_pruned(net, neurons, pruned, search_t, held_t, FinetuneSettings(
            epochs=config.finetune_epochs, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
            batch_size=config.batch_size, augment=config.augment, hflip=config.hflip, seed=config.seed + 1,
            padding=crop_padding(input_shape)),
            trace, progress)
    acc_after = accuracy_of(net, held_t)
    return RepairResult(
        model=net.cpu(), method=NAME, pruned=by_name(neurons, pruned), clean_acc_before=acc_before,
        clean_acc_after=acc_after, seconds=timer.seconds, trace=trace,
        details={"layer": layer.name, "group": [neurons.layers[li].name for li in group],
                 "mean_activation": act.tolist(), "num_pruned_channels": kept_k, "layer_size": layer.size,
                 "acc_after_pruning": acc_pruned, "max_acc_drop": config.max_acc_drop,
                 "finetune_undone": finetune_undone},
    )
