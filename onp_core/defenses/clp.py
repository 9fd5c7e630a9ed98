"""CLP — Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022). Data-free.

"Data-free Backdoor Removal based on Channel Lipschitzness", after the official code
(github.com/rkteddy/channel-Lipschitzness-based-pruning, ``defense.py``): for a conv → BN
pair, channel k computes ``(γ_k/σ_k)·(W_k ∗ x) + const``, so its upper bound of the channel
Lipschitz constant is

    UCLC_k = |γ_k| / σ_k · ‖W_k‖₂,   W_k reshaped to [in, kh·kw], ‖·‖₂ the largest singular value,

with σ_k = sqrt(running_var_k + eps) (the official code omits eps; with it this is exactly the
factor BN applies, and a dead channel with zero variance cannot make the layer's statistics
infinite). In every layer, channels with UCLC_k > mean + u·std (u = 3, unbiased std as
``torch.Tensor.std``) are pruned — γ_k and β_k zeroed, as the official code does.

Pairing comes from the traced graph, not from module order: each BN neuron layer is paired
with the conv(s) that *produce its input* (``NeuronLayer.producers``). In PreAct-ResNets the
BN before a conv therefore belongs to the previous conv, never to the conv it feeds (the
official module-order pairing gets this wrong). A BN whose input is a residual sum has several
producers (the convs of the blocks summed into the stream, found through identity shortcuts):
channel k's output is then γ_k/σ_k · Σ_j (W_j,k ∗ x_j), whose Lipschitz constant is bounded by
the triangle inequality, so the per-producer norms are **summed**:
UCLC_k = |γ_k|/σ_k · Σ_j ‖W_j,k‖₂. A conv neuron layer without BN uses ‖W_k‖₂ alone. Layers
with no conv producer (e.g. a BN on the raw input) are skipped.

The clean data is used only to report the held-out clean accuracy before and after.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..data.dataset import ImageSet
from ..device import resolve_device
from ..models import ImageClassifier
from ..neurons import NeuronMap, discover_neurons, prune
from .base import DefenseConfig, ProgressCallback, RepairResult, Timer, clean_splits, report, working_copy
from .common import Tensors, accuracy_of, bn_statistics, by_name

NAME = "clp"


class Config(DefenseConfig):
    """CLP hyper-parameters."""

    u: float = Field(3.0, description="prune channels whose UCLC exceeds mean + u·std of their layer")


def _filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each output filter reshaped to [in, kh·kw] (official CLP)."""
    w = weight.detach().double().cpu()
    w = w.reshape(w.shape[0], w.shape[1], -1)
    return torch.linalg.matrix_norm(w, ord=2).float()


@torch.no_grad()
def channel_lipschitz(model: ImageClassifier, neurons: NeuronMap) -> dict[int, torch.Tensor]:
    """UCLC of every channel of every neuron layer that has a conv producer: {layer index: [size]}."""
    params = dict(model.named_parameters())
    stats = bn_statistics(model, neurons, model.manifest.input_shape)
    out: dict[int, torch.Tensor] = {}
    for li, layer in enumerate(neurons.layers):
        producers = [p for p in layer.producers if p in params and params[p].ndim >= 3
                     and params[p].shape[0] == layer.size]
        if not producers:
            continue
        norm = sum(_filter_norms(params[p]) for p in producers)
        if layer.kind == "bn":
            if li not in stats:
                continue
            var, eps = stats[li]
            gamma = params[layer.params[0]].detach().float().cpu()
            norm = norm * gamma.abs() / (var.float().cpu() + eps).sqrt()
        out[li] = norm
    return out


def select(uclc: dict[int, torch.Tensor], u: float) -> dict[int, list[int]]:
    """Channels with UCLC > mean + u·std within their layer."""
    chosen = {}
    for li, values in uclc.items():
        if len(values) < 2:
            continue
        idx = torch.nonzero(values > values.mean() + u * values.std()).flatten().tolist()
        if idx:
            chosen[li] = idx
    return chosen


def repair(model: ImageClassifier, clean: ImageSet, config: Config, progress: ProgressCallback | None = None
           ) -> RepairResult:
    """Prune the channels with outlying Lipschitz upper bounds; ``clean`` only reports accuracy."""
    timer = Timer()
    device = resolve_device(config.device)
    _, held = clean_splits(clean, config)
    net = working_copy(model)
    neurons = discover_neurons(net, model.manifest.input_shape)
    report(progress, 0, 2, "lipschitz")
    uclc = channel_lipschitz(net, neurons)
    selected = select(uclc, config.u)
    report(progress, 1, 2, "prune", num_pruned=sum(len(c) for c in selected.values()))
    held_t = Tensors.of(held, device)
    net.to(device)
    acc_before = accuracy_of(net, held_t)
    prune(net, neurons, selected)
    acc_after = accuracy_of(net, held_t)
    trace: list[dict[str, Any]] = [
        {"phase": "lipschitz", "layer": neurons.layers[li].name, "mean": float(v.mean()), "std": float(v.std()),
         "max": float(v.max()), "num_pruned": len(selected.get(li, []))} for li, v in uclc.items()]
    trace.append({"phase": "prune", "num_pruned": sum(len(c) for c in selected.values()), "acc": acc_after})
    report(progress, 2, 2, "prune", acc=acc_after)
    return RepairResult(
        model=net.cpu(), method=NAME, pruned=by_name(neurons, selected), clean_acc_before=acc_before,
        clean_acc_after=acc_after, seconds=timer.seconds, trace=trace,
        details={"u": config.u, "uclc": {neurons.layers[li].name: v.tolist() for li, v in uclc.items()},
                 "producers": {neurons.layers[li].name: neurons.layers[li].producers for li in uclc},
                 "num_neurons": neurons.total},
    )
