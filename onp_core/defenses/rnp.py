"""RNP — Reconstructive Neuron Pruning (Li et al., ICML 2023).

"Reconstructive Neuron Pruning for Backdoor Defense", reproduced after the official code
(github.com/bboylyg/RNP, ``main.py``):

1. **unlearn** — a copy of the model is trained by gradient *ascent* on the clean data
   (SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, MultiStepLR ×0.1 at epochs
   10 and 20, gradient norm clipped to 20) until its running clean training accuracy over an
   epoch is ≤ 0.2 (at most 20 epochs);
2. **recover** — the unlearned model is frozen and each neuron (BN channel, or conv channel
   without BN) gets a mask ``m ∈ [0, 1]`` (init 1) on its weight (``MaskBatchNorm2d``: γ·m, β
   unchanged), learned by SGD (lr 0.2, momentum 0.9) on ``α·CE`` (α = 0.2) for 20 epochs
   over the clean data, masks clipped to [0, 1]; the backdoor neurons, damaged least by the
   clean unlearning, stay low;
3. **prune** the ORIGINAL model: neurons whose mask is ≤ 0.2 (official default
   ``--pruning-by threshold``), or the ``prune_number`` smallest. Only γ is zeroed, as the
   official ``pruning()`` does (``prune_bias=True`` zeroes β too).

Both optimisation phases run the model in train mode with the official CIFAR augmentation
(random crop + flip). The official code sweeps thresholds and scores them on poisoned test
data; :func:`repair` uses the fixed threshold, and :func:`oracle_sweep` is the reference-only
sweep for benchmarks.

Deviation noted: the official loop calls ``clip_grad_norm_`` before ``backward()`` (where
it is a no-op); here the clip is applied to the fresh gradients, as intended.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.dataset import ImageSet
from ..device import resolve_device
from ..models import ImageClassifier
from ..neurons import discover_neurons
from .base import DefenseConfig, ProgressCallback, RepairResult, Timer, clean_splits, report, working_copy
from .common import (Sampler, Tensors, accuracy_of, by_name, crop_padding, forward_with, scaled_params, scratch_copy,
                     select_by_mask, set_training, sweep_masks, zero_channels)

NAME = "rnp"


class Config(DefenseConfig):
    """RNP hyper-parameters; defaults are the official code's."""

    batch_size: int = Field(128, ge=1, description="clean images per batch")
    unlearning_lr: float = Field(0.01, gt=0, description="SGD learning rate of the unlearning (gradient ascent)")
    unlearning_epochs: int = Field(20, ge=1, description="at most this many unlearning epochs")
    clean_threshold: float = Field(0.2, ge=0, le=1, description="stop unlearning once the epoch's clean training "
                                                                "accuracy is ≤ this")
    schedule: list[int] = Field([10, 20], description="unlearning epochs at which the lr is multiplied by 0.1")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (both phases)")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay of the unlearning")
    max_grad_norm: float = Field(20.0, gt=0, description="gradient-norm clip of the unlearning")
    recovering_lr: float = Field(0.2, gt=0, description="SGD learning rate of the masks")
    recovering_epochs: int = Field(20, ge=1, description="epochs of mask learning on the unlearned model")
    alpha: float = Field(0.2, gt=0, description="loss weight of the mask learning (official --alpha)")
    prune_by: Literal["threshold", "number"] = Field("threshold", description="pruning rule on the mask values")
    threshold: float = Field(0.2, ge=0, le=1, description="prune neurons with mask ≤ threshold")
    prune_number: int | None = Field(None, ge=0, description="with prune_by='number': how many neurons to prune")
    prune_bias: bool = Field(False, description="also zero β of pruned neurons (official RNP zeroes only γ)")
    augment: bool = Field(True, description="random crop + flip on the clean batches (official CIFAR loader)")
    hflip: bool = Field(True, description="horizontal flips in the augmentation")


def unlearn(model: ImageClassifier, data: Tensors, config: Config, progress: ProgressCallback | None = None,
            trace: list[dict[str, Any]] | None = None) -> int:
    """Gradient ascent on clean data, in place, until the epoch's training accuracy ≤ clean_threshold.

    Returns the number of epochs run.
    """
    torch.manual_seed(config.seed)
    sampler = Sampler(data, config.batch_size, config.seed + 1, config.augment,
                      crop_padding(model.manifest.input_shape), config.hflip)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=config.unlearning_lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=config.schedule, gamma=0.1)
    set_training(model, True)
    epochs = 0
    for epoch in range(config.unlearning_epochs):
        correct, seen, loss_sum = 0, 0, 0.0
        for x, y in sampler.epoch():
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = F.cross_entropy(out, y)
            (-loss).backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm=config.max_grad_norm)
            opt.step()
            correct += int((out.detach().argmax(1) == y).sum())
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
        sched.step()
        epochs = epoch + 1
        acc = correct / seen
        if trace is not None:
            trace.append({"phase": "unlearn", "epoch": epochs, "loss": loss_sum / seen, "train_acc": acc})
        report(progress, epochs, config.unlearning_epochs, "unlearn", loss=loss_sum / seen, train_acc=acc)
        if acc <= config.clean_threshold:
            break
    set_training(model, False)
    for p in params:
        p.requires_grad_(False)
    return epochs


def recover_masks(model: ImageClassifier, neurons: Any, data: Tensors, config: Config,
                  progress: ProgressCallback | None = None,
                  trace: list[dict[str, Any]] | None = None) -> dict[int, torch.Tensor]:
    """Learn neuron masks (on γ) of the frozen unlearned ``model`` that restore the clean loss."""
    device = data.x.device
    sampler = Sampler(data, config.batch_size, config.seed + 2, config.augment,
                      crop_padding(model.manifest.input_shape), config.hflip)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = {li: torch.ones(layer.size, device=device, requires_grad=True) for li, layer in enumerate(neurons.layers)}
    opt = torch.optim.SGD(list(masks.values()), lr=config.recovering_lr, momentum=config.momentum)
    set_training(model, True)
    for epoch in range(config.recovering_epochs):
        correct, seen, loss_sum = 0, 0, 0.0
        for x, y in sampler.epoch():
            opt.zero_grad(set_to_none=True)
            out = forward_with(model, scaled_params(model, neurons, masks), x)
            loss = config.alpha * F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in masks.values():
                    m.clamp_(0.0, 1.0)
            correct += int((out.detach().argmax(1) == y).sum())
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
        all_m = torch.cat([m.detach() for m in masks.values()])
        entry = {"phase": "recover", "epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen,
                 "below_threshold": int((all_m <= config.threshold).sum()), "mask_mean": float(all_m.mean())}
        if trace is not None:
            trace.append(entry)
        report(progress, epoch + 1, config.recovering_epochs, "recover", loss=entry["loss"],
               train_acc=entry["train_acc"], below_threshold=entry["below_threshold"])
    set_training(model, False)
    return {li: m.detach().cpu() for li, m in masks.items()}


def repair(model: ImageClassifier, clean: ImageSet, config: Config, progress: ProgressCallback | None = None
           ) -> RepairResult:
    """Unlearn, recover masks on the unlearned copy, prune the original by the mask threshold."""
    timer = Timer()
    device = resolve_device(config.device)
    search, held = clean_splits(clean, config)
    net = scratch_copy(model, device)
    neurons = discover_neurons(net, model.manifest.input_shape)
    held_t, search_t = Tensors.of(held, device), Tensors.of(search, device)
    acc_before = accuracy_of(net, held_t)
    trace: list[dict[str, Any]] = []

    report(progress, 0, config.unlearning_epochs, "unlearn")
    epochs = unlearn(net, search_t, config, progress, trace)
    unlearned_acc = accuracy_of(net, held_t)
    report(progress, 0, config.recovering_epochs, "recover")
    masks = recover_masks(net, neurons, search_t, config, progress, trace)
    del net

    report(progress, 0, 1, "prune")
    selected = select_by_mask(masks, config.prune_by, config.threshold, config.prune_number)
    repaired = working_copy(model).to(device)
    zero_channels(repaired, neurons, selected, weight_only=not config.prune_bias)
    acc_after = accuracy_of(repaired, held_t)
    trace.append({"phase": "prune", "num_pruned": sum(len(c) for c in selected.values()), "acc": acc_after})
    report(progress, 1, 1, "prune", acc=acc_after)
    return RepairResult(
        model=repaired.cpu(), method=NAME, pruned=by_name(neurons, selected), clean_acc_before=acc_before,
        clean_acc_after=acc_after, seconds=timer.seconds, trace=trace,
        details={"mask_values": {layer.name: masks[li].tolist() for li, layer in enumerate(neurons.layers)},
                 "unlearning_epochs": epochs, "unlearned_acc": unlearned_acc, "prune_by": config.prune_by,
                 "threshold": config.threshold, "prune_number": config.prune_number,
                 "weight_only": not config.prune_bias, "num_neurons": neurons.total},
    )


def oracle_sweep(model: ImageClassifier, result: RepairResult, clean_test: ImageSet, triggered: ImageSet,
                 target: int, thresholds: list[float] | None = None, device: str = "auto") -> dict[str, Any]:
    """REFERENCE ONLY — never used by :func:`repair`: the official threshold sweep scored with ASR
    (see :func:`onp_core.defenses.anp.oracle_sweep`)."""
    return sweep_masks(model, result, clean_test, triggered, target, thresholds, device)
