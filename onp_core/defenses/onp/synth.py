"""Trigger synthesis from clean data only: one candidate trigger per class, and which look planted.

A backdoored network has a shortcut: a small input pattern that sends *any* image to
the target class. Such a pattern can be found by optimisation on clean data alone
(Neural Cleanse's observation): a mask M and pattern P that minimise
CE(f((1−M)·x + M·P), t) + λ_t‖M‖₁. We synthesise one for *every* class in a single
batched optimisation (all K masks in one forward), with NC's per-class λ schedule
(raise λ while the trigger works, lower it while it does not) and keep each class's
smallest working mask.

The optimiser matters more than it looks (measured on 6 subjects × 2 clean sets,
docs/ONP.md §1): from a 5%-coverage start with Adam lr 0.1, 100 steps left the planted
FMNIST BadNets trigger at 15–76 px (the real one is 9): a mask that starts small finds
*a* trigger nearby and shrinks it, and often not the planted one. Starting at 27%
coverage (logit −1) with lr 0.5 found the 5–6 px planted trigger in 8 of 8 restarts;
two restarts per class (one batch, the smaller area kept) found it on every subject.

Which classes are suspicious is decided by comparison, not by any single trigger's
success: natural adversarial patches exist for every class, the planted one is an
outlier of *small* area. The anomaly index is the robust z-score (median/MAD) of
log-areas with a floor on the spread (see ``anomaly_index``). Nothing here sees the
real trigger or poisoned data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .context import Batch, ModelContext


@dataclass
class TriggerSet:
    """One synthesised mask+pattern per class and how anomalous each is."""

    masks: torch.Tensor  # [K, 1, H, W] in [0, 1]
    patterns: torch.Tensor  # [K, C, H, W] in [0, 1]
    area: torch.Tensor  # [K] mask L1 (pixels) of the smallest working trigger found
    success: torch.Tensor  # [K] hit rate of that trigger on the synthesis data
    anomaly: torch.Tensor  # [K] robust z-score of −log(area): large = suspiciously small trigger
    weights: torch.Tensor  # [K] in [0, 1]: how much each class counts in the backdoor score
    restart_area: torch.Tensor | None = None  # [R, K] smallest working area of each restart

    @property
    def suspects(self) -> list[int]:
        """Classes with a non-zero weight, most anomalous first."""
        order = self.anomaly.argsort(descending=True).tolist()
        return [k for k in order if self.weights[k] > 0]

    def apply(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Stamp trigger k at raised opacity (√mask).

        The synthesised mask is the *boundary* of the shortcut: the least opacity that
        still flipped 8 images. Scored at that boundary, pruning broke the synthetic
        trigger (target probability 0.77 → 0.07) while the planted one still worked on
        23% of images; at √mask the same search took the real ASR to 2–7% on four BadNets
        subjects (docs/ONP.md §1). The area used for detection is the raw mask's.
        """
        m, p = self.masks[k].to(x.device).sqrt(), self.patterns[k].to(x.device)
        return (1 - m) * x + m * p

    def summary(self) -> dict[str, list[float]]:
        return {"area": [round(float(v), 1) for v in self.area],
                "success": [round(float(v), 3) for v in self.success],
                "anomaly": [round(float(v), 2) for v in self.anomaly],
                "weights": [round(float(v), 3) for v in self.weights]}


def anomaly_index(area: torch.Tensor, min_spread: float = 0.5) -> torch.Tensor:
    """Robust z-score of −log(area), its spread floored at ``min_spread`` (log units).

    σ is 1.4826·MAD (≈ σ for a normal distribution), but never below ``min_spread``: once
    the synthesis converges the natural classes' areas cluster tightly (MAD down to 0.1),
    and a natural class only 2.2× smaller than the median then scored 6.5 on a clean
    model. With the floor at 0.5 a class must be ~2.7× smaller than the median to reach
    z = 2 however tight the others are (measured, docs/ONP.md: natural classes of a clean
    model ≤ 0.8 log units below the median, planted 3×3 BadNets triggers 2.0–2.3, a
    full-image Blended trigger 1.1–1.2).
    """
    log_area = area.clamp_min(1e-3).log()
    med = log_area.quantile(0.5)
    mad = (log_area - med).abs().quantile(0.5) * 1.4826
    return (med - log_area) / mad.clamp_min(min_spread)


def anomaly_weights(anomaly: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """0 below ``low`` (ordinary), 1 above ``high`` (NC's outlier bar is 2), linear between."""
    return ((anomaly - low) / max(1e-6, high - low)).clamp(0, 1)


def synthesize_triggers(ctx: ModelContext, batch: Batch, num_classes: int, steps: int = 100,
                        per_class: int = 8, seed: int = 0, low: float = 1.5, high: float = 2.5,
                        success_bar: float = 0.9, keep: torch.Tensor | None = None, restarts: int = 2,
                        lr: float = 0.5, mask_init: float = -1.0, min_spread: float = 0.5) -> TriggerSet:
    """Neural-Cleanse style synthesis for every class at once; see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    dev = ctx.device
    x_all, y_all = batch.x, batch.y.cpu()
    k, (c, h, w) = num_classes, x_all.shape[1:]
    n = k * restarts  # optimisation slots: slot s works for class s % k
    owner = torch.arange(n) % k
    # Pools of non-target images per class; a class with none (tiny sets) borrows all images.
    pools = [torch.nonzero(y_all != t).flatten() for t in range(k)]
    pools = [p if len(p) else torch.arange(len(y_all)) for p in pools]
    slot_pools = [pools[int(t)] for t in owner]
    m_param = torch.full((n, 1, h, w), float(mask_init), device=dev, requires_grad=True)
    p_param = (torch.randn(n, c, h, w, generator=g) * 0.1).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([m_param, p_param], lr=lr, betas=(0.5, 0.9))
    lam = torch.full((n,), 1e-3, device=dev)
    best_area = torch.full((n,), float("inf"), device=dev)
    best_succ = torch.zeros(n, device=dev)
    best_m = torch.sigmoid(m_param.detach()).clone()
    best_p = torch.sigmoid(p_param.detach()).clone()
    target = owner.to(dev).repeat_interleave(per_class)
    ctx.net.set_masks(None if keep is None else ctx.split_flat(keep.to(dev)))
    try:
        for step in range(steps):
            idx = torch.stack([p[torch.randint(0, len(p), (per_class,), generator=g)] for p in slot_pools]).to(dev)
            m, p = torch.sigmoid(m_param), torch.sigmoid(p_param)
            xt = (1 - m[:, None]) * x_all[idx] + (m * p)[:, None]
            out = ctx.net(xt.flatten(0, 1))
            ce = F.cross_entropy(out, target, reduction="none").view(n, per_class).mean(1)
            area = m.flatten(1).sum(1)
            loss = (ce + lam * area).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                succ = (out.argmax(1) == target).float().view(n, per_class).mean(1)
                ok = succ >= success_bar
                if step >= steps // 10:  # NC's schedule: trade area for success once the patterns took shape
                    lam = torch.where(ok, lam * 1.2, lam / 1.2 ** 1.5).clamp(1e-5, 10.0)
                better = ok & (area < best_area)
                best_area = torch.where(better, area, best_area)
                best_succ = torch.where(better, succ, best_succ)
                best_m[better], best_p[better] = m[better], p[better]
    finally:
        ctx.net.set_masks(None)
    restart_area = best_area.view(restarts, k).cpu()
    # Each class keeps its best restart.
    slot = best_area.view(restarts, k).argmin(0) * k + torch.arange(k, device=dev)
    best_area, best_succ, best_m, best_p = best_area[slot], best_succ[slot], best_m[slot], best_p[slot]
    # A class whose trigger never worked gets the whole image as its area: not suspicious.
    never = ~torch.isfinite(best_area)
    best_area = torch.where(never, torch.full_like(best_area, float(h * w)), best_area)
    anomaly = anomaly_index(best_area.cpu(), min_spread)
    return TriggerSet(best_m.detach().cpu(), best_p.detach().cpu(), best_area.cpu(), best_succ.cpu(), anomaly,
                      anomaly_weights(anomaly, low, high), restart_area)


def triggered_images(triggers: TriggerSet, batch: Batch, classes: list[int], limit: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each class k: up to ``limit`` non-k images carrying trigger k; and the k of every row."""
    xs, owners = [], []
    for k in classes:
        x = batch.x[batch.y != k][:limit]
        xs.append(triggers.apply(k, x))
        owners.append(torch.full((len(x),), k, dtype=torch.long, device=x.device))
    if not xs:
        return batch.x[:0], batch.y[:0]
    return torch.cat(xs), torch.cat(owners)


@torch.no_grad()
def target_probability(ctx: ModelContext, triggers: TriggerSet, batch: Batch, keep: torch.Tensor | None,
                       classes: list[int] | None = None, limit: int = 256) -> dict[int, float]:
    """Per suspect class k: mean probability of k for non-k images carrying trigger k.

    A probability rather than a hit rate: the hit rate of a synthesised trigger
    saturates at 1 while the shortcut is only partly cut (measured: ≥ 0.87 while the real
    ASR fell from 93% to 0.2%); the probability keeps falling as more of it is pruned.
    """
    classes = triggers.suspects if classes is None else classes
    if not classes:
        return {}
    x, owner = triggered_images(triggers, batch, classes, limit)
    probs = ctx.logits(keep, x).softmax(1).gather(1, owner[:, None]).squeeze(1)
    return {k: float(probs[owner == k].mean()) if bool((owner == k).any()) else 0.0 for k in classes}


@torch.no_grad()
def activation_gain(ctx: ModelContext, triggers: TriggerSet, batch: Batch, limit: int = 256) -> list[torch.Tensor]:
    """Per neuron: weighted mean over suspects of (activation with trigger k − without)."""
    x = batch.x[:limit]
    _, clean_acts = ctx.net.forward_with_activations(x)
    gains = [torch.zeros(s) for s in ctx.sizes]
    total_w = float(triggers.weights.sum())
    if total_w <= 0:
        return gains
    for kk in triggers.suspects:
        _, trig_acts = ctx.net.forward_with_activations(triggers.apply(kk, x))
        wk = float(triggers.weights[kk]) / total_w
        for i, (a, b) in enumerate(zip(clean_acts, trig_acts)):
            dims = [0] + list(range(2, a.ndim))
            gains[i] += wk * (b.float().relu().mean(dims) - a.float().relu().mean(dims)).cpu()
    return gains

