"""Trigger synthesis from clean data only: one candidate trigger per class, and which look planted.

A backdoored network has a shortcut: a small input change that sends *any* image to
the target class. Such a change can be found by optimisation on clean data alone
(Neural Cleanse's observation). We search three families of change for every class at
once (``families.py``: a per-pixel mask, a full-image blend, a smooth warp) and keep,
per class and family, the cheapest change that still works.

Which classes are suspicious is decided by comparison, not by any single trigger's
success: natural shortcuts exist for every class, the planted one is an outlier of
*low cost* within its family. Each family's anomaly index is the robust z-score
(median/MAD) of log-costs with a floor on the spread (see ``anomaly_index``); a class's
index is its largest over the families, and its trigger is that family's. Nothing here
sees the real trigger or poisoned data.

The mask optimiser matters more than it looks (measured on 6 subjects × 2 clean sets,
docs/ONP.md §1): from a 5%-coverage start with Adam lr 0.1, 100 steps left the planted
FMNIST BadNets trigger at 15–76 px (the real one is 9); starting at 27% coverage (logit
−1) with lr 0.5 found the 5–6 px planted trigger in 8 of 8 restarts; two restarts per
class (one batch, the cheaper kept) found it on every subject.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from .context import Batch, ModelContext
from .families import FAMILIES, FamilyResult, optimise_family, stamp

# What the anomaly index's MAD is taken over: every class, or those at or below the median (``anomaly_index``).
Spread = Literal["all", "lower"]


@dataclass
class TriggerSet:
    """One synthesised trigger per class (from the family where it is most anomalous)."""

    family: list[str]  # [K] the family of each class's kept trigger
    params: list[dict[str, torch.Tensor]]  # [K] that trigger's tensors (see ``families.stamp``)
    cost: torch.Tensor  # [K] its cost in its family's unit (mask pixels, opacity, flow pixels)
    success: torch.Tensor  # [K] hit rate of that trigger on the synthesis data
    anomaly: torch.Tensor  # [K] largest robust z-score of −log(cost) over the families
    weights: torch.Tensor  # [K] in [0, 1]: how much each class counts in the backdoor score
    by_family: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # diagnostics per family

    @property
    def suspects(self) -> list[int]:
        """Classes with a non-zero weight, most anomalous first."""
        order = self.anomaly.argsort(descending=True).tolist()
        return [k for k in order if self.weights[k] > 0]

    def apply(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Stamp trigger k, raised past its synthesis boundary (``families.stamp``)."""
        return stamp(self.family[k], self.params[k], x)

    def summary(self) -> dict:
        return {"family": list(self.family),
                "cost": [round(float(v), 3) for v in self.cost],
                "success": [round(float(v), 3) for v in self.success],
                "anomaly": [round(float(v), 2) for v in self.anomaly],
                "weights": [round(float(v), 3) for v in self.weights],
                "by_family": self.by_family}


def anomaly_index(cost: torch.Tensor, min_spread: float = 0.5, spread: Spread = "all") -> torch.Tensor:
    """Robust z-score of −log(cost), its spread floored at ``min_spread`` (log units).

    σ is 1.4826·MAD (≈ σ for a normal distribution), but never below ``min_spread``: once
    the synthesis converges the natural classes' costs cluster tightly (MAD down to 0.1),
    and a natural class only 2.2× cheaper than the median then scored 6.5 on a clean
    model. With the floor at 0.5 a class must be ~2.7× cheaper than the median to reach
    z = 2 however tight the others are (measured, docs/ONP.md: natural classes of a clean
    model ≤ 0.8 log units below the median, planted 3×3 BadNets masks 2.0–2.3).

    ``spread="lower"`` takes the MAD over the classes at or below the median only (the left
    half of a double MAD), a one-sided spread for a one-sided test. Measured and *not* the
    default (docs/ONP.md §1z): on CIFAR-10 a warp never reaches 4 of 10 classes, the whole MAD
    is wide, and the lower half's raised a weak planted warp from 0.85–1.36 to 2.17–2.59; but
    it raised the natural warp class 2 of the SIG subject to 2.05 as well, and its search then
    left SIG (removed at the defaults) at 57–76%. ``"all"`` (default) is the one MAD.
    """
    if spread not in get_args(Spread):
        raise ValueError(f"unknown anomaly spread {spread!r}; one of {get_args(Spread)}")
    log_cost = cost.clamp_min(1e-6).log()
    med = log_cost.quantile(0.5)
    side = log_cost[log_cost <= med] if spread == "lower" else log_cost
    mad = (side - med).abs().quantile(0.5) * 1.4826
    return (med - log_cost) / mad.clamp_min(min_spread)


def anomaly_weights(anomaly: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """0 below ``low`` (ordinary), 1 above ``high`` (NC's outlier bar is 2), linear between."""
    return ((anomaly - low) / max(1e-6, high - low)).clamp(0, 1)


def combine_families(results: list[FamilyResult], low: float, high: float, min_spread: float,
                     spread: Spread = "all") -> TriggerSet:
    """Per class, keep the family where its trigger is most anomalous (see the module docstring)."""
    z = torch.stack([anomaly_index(r.cost, min_spread, spread) for r in results])  # [F, K]
    anomaly, pick = z.max(0)
    k = len(anomaly)
    chosen = [results[int(pick[c])] for c in range(k)]
    by_family = {r.family: {"cost": [round(float(v), 3) for v in r.cost],
                            "anomaly": [round(float(v), 2) for v in z[i]]} for i, r in enumerate(results)}
    return TriggerSet(family=[r.family for r in chosen],
                      params=[{name: v[c] for name, v in r.params.items()} for c, r in enumerate(chosen)],
                      cost=torch.stack([r.cost[c] for c, r in enumerate(chosen)]),
                      success=torch.stack([r.success[c] for c, r in enumerate(chosen)]),
                      anomaly=anomaly, weights=anomaly_weights(anomaly, low, high), by_family=by_family)


def synthesize_triggers(ctx: ModelContext, batch: Batch, num_classes: int, steps: int = 100,
                        per_class: int = 8, seed: int = 0, low: float = 1.5, high: float = 2.5,
                        success_bar: float = 0.9, keep: torch.Tensor | None = None, restarts: int = 2,
                        min_spread: float = 0.5, families: tuple[str, ...] = FAMILIES,
                        on_step: Callable[[str, int, int], None] | None = None,
                        mask_restarts: int | None = None, spread: Spread = "all") -> TriggerSet:
    """Synthesise every class's cheapest trigger in each family and rank the classes; see the module docstring.

    ``keep`` (a flat keep-mask) synthesises on a partly pruned network. ``on_step(family, done,
    steps)`` follows the optimisation step by step (progress, cancellation). ``mask_restarts``
    (default: ``restarts``) sets the mask family's own: its per-pixel search lands in a natural
    ~45 px minimum on about a third of its restarts on a residual network (docs/ONP.md §1r); the
    one-opacity and 32-value families have far fewer minima to land in. ``spread`` is
    ``anomaly_index``'s.
    """
    ctx.net.set_masks(None if keep is None else ctx.split_flat(keep.to(ctx.device)))
    try:
        results = [optimise_family(ctx, batch, num_classes, fam, steps, per_class,
                                   mask_restarts if fam == "mask" and mask_restarts else restarts, seed + i,
                                   success_bar,
                                   on_step=None if on_step is None else
                                   (lambda done, total, fam=fam: on_step(fam, done, total)))
                   for i, fam in enumerate(families)]
    finally:
        ctx.net.set_masks(None)
    return combine_families(results, low, high, min_spread, spread)


def stamp_some(trigger_sets: list[TriggerSet], share: float, seed: int
               ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """A batch transform for the optional fine-tune: ``share`` of the images get a suspect's trigger.

    Each stamped image gets the trigger of a suspect class other than its own, drawn in
    proportion to the suspects' weights; labels are untouched, so training on them
    teaches the network to ignore the shortcut (Neural Cleanse's unlearning). Plain
    clean fine-tuning brought a pruned Blended backdoor back (FMNIST: ASR 0 → 0.88
    in 5 epochs, docs/ONP.md). None when no class is a suspect.
    """
    pool = [(ts, k, float(ts.weights[k])) for ts in trigger_sets for k in ts.suspects]
    if share <= 0 or not pool:
        return None
    g = torch.Generator().manual_seed(seed + 7)
    probs = torch.tensor([w for _, _, w in pool])

    def transform(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pick = torch.rand(len(x), generator=g) < share
        which = torch.multinomial(probs, len(x), replacement=True, generator=g)
        x, y = x.clone(), y.cpu()
        for j, (ts, k, _) in enumerate(pool):
            rows = torch.nonzero(pick & (which == j) & (y != k)).flatten().to(x.device)
            if len(rows):
                x[rows] = ts.apply(k, x[rows])
        return x

    return transform


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

