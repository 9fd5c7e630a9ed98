"""ANP — Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

"Adversarial Neuron Pruning Purifies Backdoored Deep Models", reproduced after the official
code (github.com/csdongxian/ANP_backdoor, ``optimize_mask_cifar.py`` + ``prune_neuron_cifar.py``):

* every neuron (channel of a BN layer, or of a conv with no BN after it) gets a mask
  ``m ∈ [0, 1]`` (init 1) and two multiplicative adversarial perturbations ``δ, ξ ∈ [−ε, ε]``;
  the layer computes with weight ``γ·(m + δ)`` and bias ``β·(1 + ξ)`` when perturbed, and
  ``γ·m``, ``β`` when not (``NoisyBatchNorm2d``);
* per iteration, on a batch of 128 clean images drawn with replacement (random crop + flip,
  as the official loader): δ, ξ start uniform in [−ε, ε] and take ``anp_steps`` signed-gradient
  ascent steps of size ε/steps on the clean loss (projected back to [−ε, ε] — the paper's
  constraint; the official code leaves them unprojected, ``clip_noise=False``); then the masks
  take one SGD step (lr 0.2, momentum 0.9) on ``α·L(m) + (1 − α)·L(m + δ, 1 + ξ)`` and are
  clipped to [0, 1]; 2000 iterations, ε = 0.4, α = 0.2, model in train mode (batch statistics);
* pruning: neurons whose mask is ≤ 0.2 (fixed threshold — it needs no poisoned data), or the
  ``prune_number`` smallest masks. Like the official ``pruning()``, only the weight (γ) of a
  pruned neuron is zeroed by default (``prune_bias=True`` zeroes β as well).

The official code then sweeps thresholds and reads ASR on a poisoned test set to pick a row;
that needs the attack, so :func:`repair` never does it. :func:`oracle_sweep` reproduces that
sweep as a *reference-only* number for benchmarks.
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

NAME = "anp"


class Config(DefenseConfig):
    """ANP hyper-parameters; defaults are the official code's."""

    iterations: int = Field(2000, ge=1, description="mask optimisation iterations (official nb_iter)")
    batch_size: int = Field(128, ge=1, description="clean images per iteration, drawn with replacement")
    lr: float = Field(0.2, gt=0, description="SGD learning rate of the masks")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of the masks")
    anp_eps: float = Field(0.4, ge=0, description="bound ε of the multiplicative neuron perturbations δ, ξ")
    anp_steps: int = Field(1, ge=1, description="signed-gradient steps (size ε/steps) for the perturbation")
    anp_alpha: float = Field(0.2, ge=0, le=1, description="trade-off α: loss = α·natural + (1−α)·perturbed")
    clip_noise: bool = Field(True, description="project δ, ξ back to [−ε, ε] after each step (paper); "
                                               "the official code does not")
    prune_by: Literal["threshold", "number"] = Field("threshold", description="pruning rule on the mask values")
    threshold: float = Field(0.2, ge=0, le=1, description="prune neurons with mask ≤ threshold")
    prune_number: int | None = Field(None, ge=0, description="with prune_by='number': how many neurons to prune")
    prune_bias: bool = Field(False, description="also zero β of pruned neurons (official ANP zeroes only γ)")
    augment: bool = Field(True, description="random crop + flip on the clean batches (official CIFAR loader)")
    hflip: bool = Field(True, description="horizontal flips in the augmentation")
    bn_mode: Literal["train", "eval"] = Field("train", description="BN statistics during mask optimisation: "
                                              "'train' = batch statistics as the official code; .pt2 programs "
                                              "always use running statistics")
    trace_every: int = Field(20, ge=1, description="record a trace entry every this many iterations")


def optimize_masks(model: ImageClassifier, neurons: Any, data: Tensors, config: Config,
                   progress: ProgressCallback | None = None,
                   trace: list[dict[str, Any]] | None = None) -> dict[int, torch.Tensor]:
    """ANP's adversarial mask optimisation on ``model`` (modified only in its BN running statistics)."""
    device = data.x.device
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    sampler = Sampler(data, config.batch_size, config.seed + 1, config.augment,
                      crop_padding(model.manifest.input_shape), config.hflip)
    for p in model.parameters():
        p.requires_grad_(False)
    set_training(model, config.bn_mode == "train")
    layers = list(range(len(neurons.layers)))
    masks = {li: torch.ones(neurons.layers[li].size, device=device, requires_grad=True) for li in layers}
    opt = torch.optim.SGD(list(masks.values()), lr=config.lr, momentum=config.momentum)
    eps, step = config.anp_eps, config.anp_eps / config.anp_steps
    alpha = config.anp_alpha
    sums = {"loss": 0.0, "loss_nat": 0.0, "loss_rob": 0.0, "correct": 0, "seen": 0}
    for it in range(config.iterations):
        x, y = sampler.random_batch()
        # step 1: adversarial neuron perturbation (maximise the clean loss)
        if eps > 0:
            noise = {li: ((torch.rand(neurons.layers[li].size, generator=g) * 2 - 1) * eps).to(device)
                     for li in layers}
            noise_b = {li: ((torch.rand(neurons.layers[li].size, generator=g) * 2 - 1) * eps).to(device)
                       for li in layers}
            for _ in range(config.anp_steps):
                for t in (*noise.values(), *noise_b.values()):
                    t.requires_grad_(True)
                over = scaled_params(model, neurons, {li: masks[li].detach() + noise[li] for li in layers},
                                     {li: 1.0 + noise_b[li] for li in layers})
                loss_noise = -F.cross_entropy(forward_with(model, over, x), y)
                grads = torch.autograd.grad(loss_noise, [*noise.values(), *noise_b.values()])
                with torch.no_grad():
                    for t, gr in zip((*noise.values(), *noise_b.values()), grads):
                        t.requires_grad_(False)
                        t.sub_(step * torch.sign(gr))  # SGD step on −loss with signed gradient
                        if config.clip_noise:
                            t.clamp_(-eps, eps)
        # step 2: mask update on the natural + perturbed loss
        opt.zero_grad(set_to_none=True)
        if eps > 0:
            over = scaled_params(model, neurons, {li: masks[li] + noise[li] for li in layers},
                                 {li: 1.0 + noise_b[li] for li in layers})
            loss_rob = F.cross_entropy(forward_with(model, over, x), y)
        else:
            loss_rob = torch.zeros((), device=device)
        out = forward_with(model, scaled_params(model, neurons, masks), x)
        loss_nat = F.cross_entropy(out, y)
        loss = alpha * loss_nat + (1 - alpha) * loss_rob
        loss.backward()
        opt.step()
        with torch.no_grad():
            for m in masks.values():
                m.clamp_(0.0, 1.0)
        sums["loss"] += float(loss.detach())
        sums["loss_nat"] += float(loss_nat.detach())
        sums["loss_rob"] += float(loss_rob.detach())
        sums["correct"] += int((out.detach().argmax(1) == y).sum())
        sums["seen"] += len(y)
        done = it + 1
        if done % config.trace_every == 0 or done == config.iterations:
            n_it = (done - 1) % config.trace_every + 1
            all_m = torch.cat([m.detach() for m in masks.values()])
            entry = {"phase": "mask", "step": done, "loss": sums["loss"] / n_it, "loss_nat": sums["loss_nat"] / n_it,
                     "loss_rob": sums["loss_rob"] / n_it, "train_acc": sums["correct"] / max(1, sums["seen"]),
                     "below_threshold": int((all_m <= config.threshold).sum()), "mask_mean": float(all_m.mean())}
            if trace is not None:
                trace.append(entry)
            sums = {k: 0 if k in ("correct", "seen") else 0.0 for k in sums}
            report(progress, done, config.iterations, "mask", loss=entry["loss"], train_acc=entry["train_acc"],
                   below_threshold=entry["below_threshold"])
    set_training(model, False)
    return {li: m.detach().cpu() for li, m in masks.items()}


def repair(model: ImageClassifier, clean: ImageSet, config: Config, progress: ProgressCallback | None = None
           ) -> RepairResult:
    """Optimise ANP masks on the clean data, then prune by the fixed mask threshold."""
    timer = Timer()
    device = resolve_device(config.device)
    search, held = clean_splits(clean, config)
    input_shape = model.manifest.input_shape
    net = scratch_copy(model, device)
    neurons = discover_neurons(net, input_shape)
    held_t = Tensors.of(held, device)
    acc_before = accuracy_of(net, held_t)
    trace: list[dict[str, Any]] = []
    report(progress, 0, config.iterations, "mask")
    masks = optimize_masks(net, neurons, Tensors.of(search, device), config, progress, trace)
    del net

    report(progress, 0, 1, "prune")
    selected = select_by_mask(masks, config.prune_by, config.threshold, config.prune_number)
    repaired = working_copy(model).to(device)
    zero_channels(repaired, neurons, selected, weight_only=not config.prune_bias)
    acc_after = accuracy_of(repaired, held_t)
    trace.append({"phase": "prune", "num_pruned": sum(len(c) for c in selected.values()), "acc": acc_after})
    report(progress, 1, 1, "prune", acc=acc_after)
    return RepairResult(
        model=repaired.cpu(), method=NAME,
        pruned=by_name(neurons, selected), clean_acc_before=acc_before, clean_acc_after=acc_after,
        seconds=timer.seconds, trace=trace,
        details={"mask_values": {layer.name: masks[li].tolist() for li, layer in enumerate(neurons.layers)},
                 "prune_by": config.prune_by, "threshold": config.threshold, "prune_number": config.prune_number,
                 "weight_only": not config.prune_bias, "num_neurons": neurons.total,
                 "iterations": config.iterations},
    )


def oracle_sweep(model: ImageClassifier, result: RepairResult, clean_test: ImageSet, triggered: ImageSet,
                 target: int, thresholds: list[float] | None = None, device: str = "auto") -> dict[str, Any]:
    """REFERENCE ONLY — never used by :func:`repair`: the official threshold sweep scored with ASR.

    Prunes ``model`` (the backdoored original) at each threshold on ``result``'s mask values and
    measures ACC on ``clean_test`` and ASR on ``triggered``; ``best`` is the row with the lowest
    ASR (ties: highest ACC). Picking a row this way needs the attack, so it is an upper bound on
    what ANP can do, for benchmark tables — not a defense.
    """
    return sweep_masks(model, result, clean_test, triggered, target, thresholds, device)
