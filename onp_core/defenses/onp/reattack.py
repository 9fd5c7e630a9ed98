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
                  x: torch.Tensor, steps: int, budget: float, lr: float) -> dict[str, torch.Tensor]:
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
    with torch.no_grad():
        return {name: v.detach().cpu() for name, v in make().items()}


def reattack(ctx: ModelContext, triggers: TriggerSet, batch: Batch, steps: int = 50, budget: float = 1.0,
             images: int = 64, lr: float = 0.1) -> TriggerSet:
    """Each suspect's trigger re-optimised on ``ctx``'s current (pruned) weights; see the module docstring.

    Classes that are not suspects keep their trigger (the score never stamps them).
    """
    params = list(triggers.params)
    success = triggers.success.clone()
    for k in triggers.suspects:
        x = batch.x[batch.y != k][:images]
        new = _reattack_one(ctx, triggers.family[k], triggers.params[k], float(triggers.cost[k]), k, x, steps,
                            budget, lr)
        params[k] = new
        hit = ctx.logits(None, stamp(triggers.family[k], new, x, boost=False))
        success[k] = float((hit.argmax(1) == k).float().mean())
    return replace(triggers, params=params, success=success)

