"""Trigger-free node features, computed once per model from clean data only.

Each feature is one of the observations in ``shared/ONP.md``:
- activation statistics on clean data (mean, std, max, fraction active);
- BN γ and β and the connection strength ‖q‖₁;
- ANP: how far a neuron's mask falls under adversarial neuron perturbation
  (backdoor neurons are the ones the perturbation exploits);
- RNP: the neuron's mask when the clean-unlearned model is recovered on clean data
  (backdoor neurons stay on in the unlearned model, so recovery switches them down);
- CLP: the channel's upper Lipschitz bound (backdoor channels are unusually steep);
- the synthesised triggers (synth.py): activation gain under them, and the
  leave-one-out effects of pruning the neuron on their target probability and on the
  clean loss (effects.py) — the most direct evidence, and the one the ablation keeps.
Features are z-scored within their layer so that one GNN serves every layer; the
trigger-derived ones also come in an absolute, model-wide-scaled form.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ...neurons import NeuronLayer
from .context import Batch, ModelContext

if TYPE_CHECKING:
    from .effects import NeuronEffects

FEATURE_NAMES = ("act_mean", "act_std", "act_max", "act_frac", "bn_gamma", "bn_beta", "q_norm", "clp_bound",
                 "trigger_gain", "backdoor_drop", "loss_rise", "anp_mask", "rnp_mask",
                 "backdoor_drop_abs", "loss_rise_abs", "trigger_gain_abs")
# Absolute (not z-scored) versions, scaled by the model-wide maximum, so they compare
# across layers: z-scoring alone would make a clean layer's most trigger-sensitive
# neuron look as suspicious as the one real backdoor neuron of another layer.
_ABSOLUTE = {"backdoor_drop_abs": "backdoor_drop", "loss_rise_abs": "loss_rise", "trigger_gain_abs": "trigger_gain"}


@dataclass
class NodeFeatures:
    per_layer: list[torch.Tensor]  # each [C, len(names)], z-scored within the layer
    raw: dict[str, list[torch.Tensor]]  # unscaled per-feature, per-layer values
    names: tuple[str, ...]

    def select(self, names: tuple[str, ...]) -> "NodeFeatures":
        idx = [self.names.index(n) for n in names]
        return NodeFeatures([f[:, idx] for f in self.per_layer], self.raw, names)


def _zscore(v: torch.Tensor) -> torch.Tensor:
    v = v.float()
    std = v.std()
    if not torch.isfinite(std) or std < 1e-8:
        return torch.zeros_like(v)
    return ((v - v.mean()) / std).clamp(-5, 5)


@torch.no_grad()
def activation_stats(ctx: ModelContext, batch: Batch, chunk: int | None = None) -> list[torch.Tensor]:
    """Per layer [C, 4]: mean, std, mean spatial max, fraction of positive activations.

    Every layer's activations of a chunk are held at once, so chunks shrink with the image area
    (500 images up to 32×32). Each chunk's statistics count by its share of the images, so the mean,
    spatial-max and positive-fraction columns are exact for any chunking (the std is the chunks'
    weighted std); one chunk gives its statistics unchanged.
    """
    chunk = chunk or ctx.images_per_forward(500)
    total = len(batch.x)
    sums = None
    for i in range(0, total, chunk):
        x = batch.x[i:i + chunk]
        _, acts = ctx.net.forward_with_activations(x)
        share = len(x) / total
        stats = []
        for a in acts:
            a = a.float()
            dims = [0] + list(range(2, a.ndim))
            flat_max = a.flatten(2).amax(2) if a.ndim > 2 else a
            stats.append(share * torch.stack([a.mean(dims), a.std(dims), flat_max.mean(0),
                                              (a > 0).float().mean(dims)], 1))
        sums = stats if sums is None else [s + t for s, t in zip(sums, stats)]
    assert sums is not None
    return [s.cpu() for s in sums]


def connection_strength(ctx: ModelContext, layer: NeuronLayer) -> torch.Tensor:
    """q_i[c] = ‖W_i[c]‖₁ over the producing conv(s) or row of a linear; [C, inputs]. Falls back to consumer columns."""
    params = dict(ctx.model.named_parameters())
    parts = []
    for name in layer.producers:
        w = params[name].detach().abs()
        if w.ndim in (2, 4) and w.shape[0] == layer.size and w.shape[1] > 1:
            parts.append(w.flatten(2).sum(2) if w.ndim == 4 else w)
    if not parts:
        for name in layer.consumers:
            w = params[name].detach().abs()
            if w.ndim == 4 and w.shape[1] == layer.size:
                parts.append(w.sum((2, 3)).t())
            elif w.ndim == 2 and w.shape[1] == layer.size:
                parts.append(w.t())
    if not parts:
        return torch.ones(layer.size, 1)
    return torch.cat(parts, 1).cpu()


def bn_affine(ctx: ModelContext, layer: NeuronLayer) -> tuple[torch.Tensor, torch.Tensor]:
    params = dict(ctx.model.named_parameters())
    if layer.kind == "bn":
        return params[layer.params[0]].detach().cpu(), params[layer.params[1]].detach().cpu()
    w = params[layer.params[0]].detach().cpu()
    bias = params[layer.params[1]].detach().cpu() if len(layer.params) > 1 else torch.zeros(layer.size)
    return w.flatten(1).norm(dim=1), bias


def clp_bound(ctx: ModelContext, layer: NeuronLayer) -> torch.Tensor:
    """Channel Lipschitz upper bound: spectral norm of each channel's (scaled) producer kernel (or row)."""
    params = dict(ctx.model.named_parameters())
    buffers = dict(ctx.model.named_buffers())
    scale = torch.ones(layer.size)
    if layer.kind == "bn":
        prefix = layer.params[0].rsplit(".", 1)[0]
        var = buffers.get(prefix + ".running_var")
        gamma = params[layer.params[0]].detach().cpu()
        scale = gamma.abs() / torch.sqrt(var.cpu() + 1e-5) if var is not None else gamma.abs()
    bound = torch.zeros(layer.size)
    found = False
    for name in layer.producers:
        w = params[name].detach().cpu()
        if w.ndim == 4 and w.shape[0] == layer.size:
            found = True
            bound += torch.linalg.matrix_norm(w.flatten(2), ord=2) if w.shape[1] > 1 else w.flatten(1).norm(dim=1)
        elif w.ndim == 2 and w.shape[0] == layer.size:  # a linear unit: its row's norm is its Lipschitz constant
            found = True
            bound += w.norm(dim=1)
    return bound * scale if found else scale


def _mask_training(ctx: ModelContext, batch: Batch, steps: int, lr: float, seed: int,
                   perturb_eps: float = 0.0, alpha: float = 1.0, batch_size: int = 128) -> torch.Tensor:
    """Learn per-neuron masks in [0,1] minimising clean loss (optionally under ANP perturbations)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(ctx.total, device=ctx.device, requires_grad=True)
    noise = torch.zeros(ctx.total, device=ctx.device, requires_grad=True)
    opt = torch.optim.SGD([mask], lr=lr, momentum=0.9)
    n = len(batch.x)
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g).to(ctx.device)
        x, y = batch.x[idx], batch.y[idx]
        loss = torch.zeros((), device=ctx.device)
        if perturb_eps > 0:
            with torch.no_grad():
                noise.uniform_(-perturb_eps, perturb_eps)
            ctx.net.set_masks(ctx.split_flat(mask.detach() * (1 + noise)))
            adv = -F.cross_entropy(ctx.net(x), y)
            grad, = torch.autograd.grad(adv, noise)
            with torch.no_grad():
                noise.sub_(perturb_eps * grad.sign()).clamp_(-perturb_eps, perturb_eps)
            ctx.net.set_masks(ctx.split_flat(mask * (1 + noise.detach())))
            loss = loss + (1 - alpha) * F.cross_entropy(ctx.net(x), y)
        ctx.net.set_masks(ctx.split_flat(mask))
        loss = loss + alpha * F.cross_entropy(ctx.net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            mask.clamp_(0, 1)
    ctx.net.set_masks(None)
    return mask.detach().cpu()


def anp_masks(ctx: ModelContext, batch: Batch, steps: int = 300, eps: float = 0.4, alpha: float = 0.2,
              seed: int = 0) -> torch.Tensor:
    """ANP's neuron masks (Wu & Wang 2021) after ``steps`` iterations: low = backdoor-prone."""
    return _mask_training(ctx, batch, steps, lr=0.2, seed=seed, perturb_eps=eps, alpha=alpha)


def unlearn(ctx: ModelContext, batch: Batch, max_epochs: int = 20, threshold: float = 0.2, lr: float = 0.01,
            seed: int = 0, batch_size: int = 128) -> torch.nn.Module:
    """RNP's first stage: gradient *ascent* on clean data until clean accuracy ≤ ``threshold``."""
    model = copy.deepcopy(ctx.model).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    n = len(batch.x)
    for _ in range(max_epochs):
        order = torch.randperm(n, generator=g).to(ctx.device)
        correct = 0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            out = model(batch.x[idx])
            loss = -F.cross_entropy(out, batch.y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 20.0)
            opt.step()
            correct += int((out.argmax(1) == batch.y[idx]).sum())
        if correct / n <= threshold:
            break
    return model.eval()


def rnp_masks(unlearned_ctx: ModelContext, batch: Batch, epochs: int = 20, seed: int = 0) -> torch.Tensor:
    """RNP's second stage: recover masks on the unlearned model; low = backdoor-prone."""
    steps = epochs * max(1, (len(batch.x) + 127) // 128)
    return _mask_training(unlearned_ctx, batch, steps, lr=0.2, seed=seed)


def compute_features(ctx: ModelContext, batch: Batch, effects: "NeuronEffects", trigger_gain: list[torch.Tensor],
                     anp: torch.Tensor | None = None, rnp: torch.Tensor | None = None) -> NodeFeatures:
    """All node features for every neuron layer of ``ctx``; ANP/RNP masks are optional (neutral when absent)."""
    acts = activation_stats(ctx, batch)
    ones = torch.ones(ctx.total)
    anp_l, rnp_l = ctx.split_flat(ones if anp is None else anp.cpu()), ctx.split_flat(ones if rnp is None else rnp.cpu())
    drop_l, rise_l = ctx.split_flat(effects.backdoor_drop), ctx.split_flat(effects.loss_rise)
    scale = {"backdoor_drop": float(effects.backdoor_drop.abs().max()) or 1.0,
             "loss_rise": float(effects.loss_rise.abs().max()) or 1.0,
             "trigger_gain": max(float(g.abs().max()) for g in trigger_gain) or 1.0}
    raw: dict[str, list[torch.Tensor]] = {n: [] for n in FEATURE_NAMES}
    per_layer = []
    for i, layer in enumerate(ctx.neurons.layers):
        gamma, beta = bn_affine(ctx, layer)
        cols = {
            "act_mean": acts[i][:, 0], "act_std": acts[i][:, 1], "act_max": acts[i][:, 2], "act_frac": acts[i][:, 3],
            "bn_gamma": gamma, "bn_beta": beta, "q_norm": connection_strength(ctx, layer).sum(1),
            "clp_bound": clp_bound(ctx, layer), "trigger_gain": trigger_gain[i].cpu(),
            "backdoor_drop": drop_l[i], "loss_rise": rise_l[i], "anp_mask": anp_l[i], "rnp_mask": rnp_l[i],
        }
        for k, source in _ABSOLUTE.items():
            cols[k] = cols[source]
        for k in FEATURE_NAMES:
            raw[k].append(cols[k].float())
        per_layer.append(torch.stack([2 * cols[_ABSOLUTE[k]].float() / scale[_ABSOLUTE[k]] if k in _ABSOLUTE
                                      else _zscore(cols[k]) for k in FEATURE_NAMES], 1))
    return NodeFeatures(per_layer, raw, FEATURE_NAMES)
