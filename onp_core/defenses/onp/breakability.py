"""Can a suspect's shortcut be cut by pruning at all? Down-weight the ones that cannot.

The anomaly index says a class has an unusually cheap trigger; it cannot say whether
that shortcut was planted. Natural shortcuts exist (Fashion-MNIST's bag and shirt
classes are as anomalous as a weak planted Blended or SIG target, docs/ONP.md §1f),
and the difference shows when one tries to prune them: a planted backdoor is carried
by a few neurons the clean task barely needs — the premise of every pruning defense —
while a natural shortcut is carried by the clean features themselves. So, per suspect
k and from clean data only: rank the neurons by how much pruning each alone lowers
k's target probability under its synthesised trigger (leave-one-out on the top
Taylor candidates), prune the top 1, 2, 3 of them, and record the least share of clean
predictions that must change (against the unpruned model) for k's target probability to
fall to half. The suspect's weight is then scaled by 1 below ``flips_low`` and 0 above
``flips_high``, linearly between — except the most breakable suspect, which always keeps
its weight. That exception is deliberate: on a model we have never seen (a wide residual
network whose backdoor is spread over more than three neurons, say) "no few neurons cut
it" may also hold for the planted target, and missing a backdoor costs half the DER while
a natural suspect that stays costs a few points of accuracy at most (docs/ONP.md §1g). So
breakability only ever drops the *secondary* suspects that cannot be cut as cheaply as
the best one.

Measured (docs/ONP.md §1g, search split of 400 clean images): planted targets halve at
1.3% (FMNIST WaNet), 4.0–4.5% (FMNIST Blended), 7.0% (CIFAR-10 BadNets) and 10.8% (FMNIST
BadNets) flips; natural classes needed 22.5% (FMNIST shirt) and 88% (FMNIST bag: no set
of ≤ 3 neurons cuts it short of wrecking the model). A suspect that pruning cannot cut
cheaply is one the search would only buy with accuracy.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .context import Batch, ModelContext
from .synth import TriggerSet, triggered_images


def _target_prob(ctx: ModelContext, x: torch.Tensor, k: int, keep: torch.Tensor | None) -> float:
    return float(ctx.logits(keep, x).softmax(1)[:, k].mean())


def _ranked_neurons(ctx: ModelContext, x_trig: torch.Tensor, k: int, base: float, candidates: int) -> torch.Tensor:
    """Neurons by the fall of k's target probability from ``base`` (unpruned) when each alone is
    pruned (Taylor, then exact)."""
    mask = torch.ones(ctx.total, device=ctx.device, requires_grad=True)
    ctx.net.set_masks(ctx.split_flat(mask))
    try:
        prob = ctx.net(x_trig).softmax(1)[:, k].mean()
        grad, = torch.autograd.grad(prob, mask)
    finally:
        ctx.net.set_masks(None)
    top = grad.argsort(descending=True)[:min(candidates, ctx.total)]
    drops = []
    for i in top.tolist():
        keep = torch.ones(ctx.total)
        keep[i] = 0
        drops.append(base - _target_prob(ctx, x_trig, k, keep))
    return top[torch.tensor(drops).argsort(descending=True)]


@torch.no_grad()
def _flips(ctx: ModelContext, x: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor) -> float:
    return float((ctx.logits(keep, x).argmax(1) != reference).float().mean())


def halving_flips(ctx: ModelContext, triggers: TriggerSet, k: int, batch: Batch, reference: torch.Tensor,
                  max_neurons: int = 3, candidates: int = 16, images: int = 96) -> float:
    """The least share of flipped clean predictions at which pruning k's top ≤ ``max_neurons`` neurons
    halves k's target probability; 1.0 when none of those sets does."""
    x_trig, _ = triggered_images(triggers, batch, [k], images)
    if len(x_trig) == 0:
        return 1.0
    base = _target_prob(ctx, x_trig, k, None)
    order = _ranked_neurons(ctx, x_trig, k, base, candidates)
    for n in range(1, max_neurons + 1):
        keep = torch.ones(ctx.total)
        keep[order[:n].cpu()] = 0
        if _target_prob(ctx, x_trig, k, keep) <= base / 2:
            return _flips(ctx, batch.x, reference, keep)
    return 1.0


def weigh_by_breakability(ctx: ModelContext, triggers: TriggerSet, batch: Batch, reference: torch.Tensor,
                          flips_low: float, flips_high: float) -> tuple[TriggerSet, dict[int, float]]:
    """``triggers`` with each suspect's weight scaled by how cheaply pruning cuts it (module docstring)."""
    measured = {k: halving_flips(ctx, triggers, k, batch, reference) for k in triggers.suspects}
    if not measured:
        return triggers, measured
    weights = triggers.weights.clone()
    most_breakable = min(measured, key=measured.__getitem__)
    for k, f in measured.items():
        if k != most_breakable:
            scale = (flips_high - f) / max(1e-6, flips_high - flips_low)
            weights[k] = weights[k] * min(1.0, max(0.0, scale))
    return replace(triggers, weights=weights), measured
