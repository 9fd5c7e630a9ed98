"""Re-attack: re-optimise each suspect's trigger on the *pruned* network, within its original cost.

After a search round the score's synthetic trigger is usually broken while the planted one
still works on a tenth of the images (docs/ONP.md §1d): the search cut the path that
particular pattern took, not the whole shortcut. Re-optimising the same trigger, warm-started
and held within ``budget`` × its synthesised cost, asks whether the pruned network can still
be hijacked that cheaply. If it can, the re-attacked trigger carries the evidence the next
search round needs; if the shortcut is gone, the re-attack finds little (a natural class
needs several times the planted cost) and the next round's score is small, so it prunes
little. Only clean images are used.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from .context import Batch, ModelContext
from .families import stamp
from .synth import TriggerSet


def _within(value: torch.Tensor, cost: torch.Tensor, limit: float) -> torch.Tensor:
    """Scale ``value`` down so that its ``cost`` is at most ``limit`` (differentiable)."""
    return value * (limit / cost.clamp_min(1e-8)).clamp(max=1.0)


def _reattack_one(ctx: ModelContext, family: str, params: dict[str, torch.Tensor], cost0: float, k: int,
                  x: torch.Tensor, steps: int, budget: float, lr: float,
                  on_step: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    dev = ctx.device
    target = torch.full((len(x),), k, device=dev, dtype=torch.long)
    h, w = x.shape[-2:]
    limit = budget * cost0
    if family == "warp":
        coarse = F.adaptive_avg_pool2d(params["flow"].permute(2, 0, 1)[None].to(dev), 4).detach().requires_grad_(True)

        def make() -> dict[str, torch.Tensor]:
            flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)[0]
            return {"flow": _within(flow, flow.abs().mean() * h / 2, limit)}
        tensors = [coarse]
    else:
        m_logit = torch.logit(params["mask"].to(dev), eps=1e-3).requires_grad_(True)
        p_logit = torch.logit(params["pattern"].to(dev), eps=1e-3).requires_grad_(True)

        def make() -> dict[str, torch.Tensor]:
            m = torch.sigmoid(m_logit)
            cost = m.sum() if family == "mask" else m.flatten()[0]
            return {"mask": _within(m, cost, limit), "pattern": torch.sigmoid(p_logit)}
        tensors = [m_logit, p_logit]
    opt = torch.optim.Adam(tensors, lr=lr, betas=(0.5, 0.9))
    for _ in range(steps):
        loss = F.cross_entropy(ctx.net(stamp(family, make(), x, boost=False)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step()
    with torch.no_grad():
        return {name: v.detach().cpu() for name, v in make().items()}


def _hit_rate(ctx: ModelContext, family: str, params: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> float:
    hit = ctx.logits(None, stamp(family, params, x, boost=False))
    return float((hit.argmax(1) == k).float().mean())


def natural_rivals(triggers: TriggerSet, k: int, count: int) -> list[int]:
    """The ``count`` non-suspect classes most anomalous in suspect k's family: the natural shortcuts
    most likely to be as cheap as k's trigger."""
    z = triggers.by_family.get(triggers.family[k], {}).get("anomaly")
    order = (torch.tensor(z) if z is not None else triggers.anomaly).argsort(descending=True).tolist()
    suspects = set(triggers.suspects)
    return [c for c in order if c not in suspects][:count]


def reattack(ctx: ModelContext, triggers: TriggerSet, batch: Batch, steps: int = 50, budget: float = 1.0,
             images: int = 64, lr: float = 0.1, rivals: int = 2, on_step: Callable[[int, int], None] | None = None
             ) -> tuple[TriggerSet, dict[int, dict[str, float]]]:
    """Each suspect's trigger re-optimised on ``ctx``'s current (pruned) weights; see the module docstring.

    With ``rivals`` > 0 each suspect is compared with that many natural classes: the same
    family, warm start and budget, re-optimised towards the natural class instead. A
    natural class that the pruned network lets in as cheaply is evidence that what is left
    is an ordinary shortcut, not the planted one, so the suspect's weight is scaled by its
    relative *excess* hit rate, 1 − rival/suspect (measured, docs/ONP.md §1g and §1i: FMNIST Blended after
    the first round, suspect 100%, natural classes 100% → 0; FMNIST BadNets 0% vs 44% → 0;
    CIFAR-10 BadNets 16% vs 11% → 0.3). Without the comparison a round with no evidence left
    still pruned whatever fixed a few clean images by chance. Returns the re-attacked set
    and, per suspect, its hit rate, the best rival's and the weight factor.

    Classes that are not suspects keep their trigger (the score never stamps them).
    ``on_step(done, total)`` follows the optimisation steps of every suspect and rival.
    """
    runs = len(triggers.suspects) * (1 + rivals)
    done = [0]

    def step() -> None:
        done[0] += 1
        if on_step is not None:
            on_step(done[0], runs * steps)
    params = list(triggers.params)
    success = triggers.success.clone()
    weights = triggers.weights.clone()
    evidence: dict[int, dict[str, float]] = {}
    for k in triggers.suspects:
        fam, cost0 = triggers.family[k], float(triggers.cost[k])
        x = batch.x[batch.y != k][:images]
        new = _reattack_one(ctx, fam, triggers.params[k], cost0, k, x, steps, budget, lr, step)
        params[k] = new
        success[k] = _hit_rate(ctx, fam, new, x, k)
        rival_hits = []
        for c in natural_rivals(triggers, k, rivals):
            xc = batch.x[batch.y != c][:images]
            rival = _reattack_one(ctx, fam, triggers.params[k], cost0, c, xc, steps, budget, lr, step)
            rival_hits.append(_hit_rate(ctx, fam, rival, xc, c))
        if rival_hits:
            best = max(rival_hits)
            factor = 0.0 if success[k] <= 0 else max(0.0, 1.0 - best / float(success[k]))
            weights[k] = weights[k] * factor
            evidence[k] = {"hit": round(float(success[k]), 3), "rival_hit": round(best, 3),
                           "factor": round(factor, 3)}
    return replace(triggers, params=params, success=success, weights=weights), evidence

