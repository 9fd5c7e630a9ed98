"""Trigger families: the shapes of input shortcut the synthesis searches for, one class at a time.

A planted backdoor is a shortcut that is *cheap* in some family: a few pixels (BadNets),
a faint full-image pattern (Blended), a sub-pixel warp (WaNet). Natural shortcuts
exist in every family too, so each family only says how cheap class k's cheapest
trigger is; ``synth.py`` compares the classes within a family.

- **mask** (Neural Cleanse): x' = (1−M)·x + M·P with a per-pixel mask M; cost ‖M‖₁ in
  pixels. Finds local patches; a full-image blend costs α·H·W here, no less than a
  natural patch, so Blended triggers did not stand out (FMNIST: index 1.85 against a
  natural 1.91, docs/ONP.md §1b).
- **blend**: the same stamp with one opacity α for the whole image; cost α. On the FMNIST
  Blended subject the target needed α = 0.05 against ≥ 0.086 for every natural class
  (index 2.4); the clean model's classes stayed ≤ 1.5.
- **warp**: x' = x sampled at identity + a smooth flow (a 4×4 control grid, bicubically
  upsampled — the smoothest field that can still bend a 28–32 px image locally); cost
  the mean displacement in pixels. On the FMNIST WaNet subject the target needed 0.46 px
  against ≥ 2.1 px for every natural class (index 3.6); clean model ≤ 0.9.

Every family is optimised the same way (``optimise_family``): all classes × restarts in
one batched forward, Adam, and Neural Cleanse's per-slot λ schedule on the cost (raise λ
while the trigger works on ≥ ``success_bar`` of its images, lower it otherwise), keeping
each slot's cheapest working trigger.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .context import Batch, ModelContext

FAMILIES = ("mask", "blend", "warp")
# How far past its synthesis boundary a blend's opacity or a warp's flow is stamped for scoring (``stamp``).
STRENGTH_BOOST = 1.5


@dataclass(frozen=True)
class _Schedule:
    """Per-family optimiser constants; λ is in units of the family's cost."""

    lr: float  # Adam step
    lam_init: float  # starting weight of the cost
    lam_max: float  # ceiling of NC's λ schedule
    never_cost: str  # cost of a class whose trigger never worked: "area" (H·W), "one" or "height" (H px)


# mask: lr 0.5 from a 27%-coverage start found the planted 5–6 px BadNets trigger in 8 of 8
# restarts (docs/ONP.md §1), λ in pixels as in Neural Cleanse; the low-dimensional families
# (one opacity, or 32 flow values) overshoot at that step and need a larger λ per unit of cost.
_SCHEDULES = {"mask": _Schedule(0.5, 1e-3, 10.0, "area"), "blend": _Schedule(0.1, 1.0, 100.0, "one"),
              "warp": _Schedule(0.05, 1.0, 100.0, "height")}


@dataclass
class FamilyResult:
    """Each class's cheapest working trigger in one family (restarts already reduced)."""

    family: str
    cost: torch.Tensor  # [K]; a class whose trigger never worked gets its family's ``never_cost``
    success: torch.Tensor  # [K] hit rate of the kept trigger on its synthesis images
    params: dict[str, torch.Tensor]  # per-class tensors, first dim K (see ``stamp``)


def _identity_grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device),
                            indexing="ij")
    return torch.stack((xs, ys), 2)[None]  # [1, H, W, 2], grid_sample's (x, y) order


def stamp(family: str, params: dict[str, torch.Tensor], x: torch.Tensor, boost: bool = True) -> torch.Tensor:
    """Apply one class's trigger (``params`` without the class dimension) to a batch x [N, C, H, W].

    ``boost`` stamps it past its synthesis boundary — the least that still flipped the
    synthesis images. Scored at that boundary, pruning broke the synthetic BadNets trigger
    while the planted one still worked on 23% of images; at √mask the search took the real
    ASR to 2–7% (docs/ONP.md §1). A mask's pixels take √opacity (×1.4 at opacity 0.5). A blend's
    one opacity is scaled by ``STRENGTH_BOOST`` instead: it is small (0.02–0.05), where a √ multiplied it
    by 4.5–7, and at that strength the synthesised pattern stops working on a network whose shortcut is
    still whole (docs/ONP.md §1y). A warp has no opacity, so its flow is scaled by the same factor.
    """
    if family == "warp":
        flow = params["flow"].to(x.device) * (STRENGTH_BOOST if boost else 1.0)
        grid = (_identity_grid(*x.shape[-2:], x.device) + flow[None]).clamp(-1, 1)
        return F.grid_sample(x, grid.expand(len(x), -1, -1, -1), align_corners=True)
    m, p = params["mask"].to(x.device), params["pattern"].to(x.device)
    if boost:
        m = m.sqrt() if family == "mask" else (m * STRENGTH_BOOST).clamp(max=1.0)
    return (1 - m) * x + m * p


class _Slots:
    """The learnable tensors of every slot in one family, and how they stamp and cost."""

    def __init__(self, family: str, n: int, shape: tuple[int, int, int], g: torch.Generator, device: torch.device,
                 mask_init: float):
        c, h, w = shape
        self.family, self.h, self.w = family, h, w
        if family == "warp":
            self.flow = (torch.randn(n, 2, 4, 4, generator=g) * 0.01).to(device).requires_grad_(True)
            self.tensors = [self.flow]
            self.ident = _identity_grid(h, w, device)
            return
        mshape = (n, 1, h, w) if family == "mask" else (n, 1, 1, 1)
        self.m = torch.full(mshape, float(mask_init), device=device, requires_grad=True)
        self.p = (torch.randn(n, c, h, w, generator=g) * 0.1).to(device).requires_grad_(True)
        self.tensors = [self.m, self.p]

    def dense_flow(self) -> torch.Tensor:
        return F.interpolate(self.flow, size=(self.h, self.w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)

    def apply(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, per, C, H, W] → (stamped x, cost [n])."""
        n, per = x.shape[:2]
        if self.family == "warp":
            flow = self.dense_flow()
            grid = (self.ident + flow).clamp(-1, 1).repeat_interleave(per, 0)
            out = F.grid_sample(x.flatten(0, 1), grid, align_corners=True).view_as(x)
            return out, flow.abs().mean((1, 2, 3)) * self.h / 2  # mean displacement in pixels
        m, p = torch.sigmoid(self.m), torch.sigmoid(self.p)
        out = (1 - m[:, None]) * x + (m * p)[:, None]
        cost = m.flatten(1).sum(1) if self.family == "mask" else m.flatten(1)[:, 0]
        return out, cost

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor]:
        if self.family == "warp":
            return {"flow": self.dense_flow().clone()}
        # a blend keeps its one opacity as [1, 1, 1] (``stamp`` broadcasts it): expanded to [1, H, W] it read as a
        # per-pixel mask, and the re-attack bounded its first pixel only (docs/ONP.md §1s)
        return {"mask": torch.sigmoid(self.m).clone(), "pattern": torch.sigmoid(self.p).clone()}


def _logits_with_grad_in_chunks(ctx: ModelContext, x: torch.Tensor, target: torch.Tensor, per_class: int,
                                max_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, ∂(Σ_slots mean_images CE)/∂x) with at most ``max_images`` images per forward.

    Each chunk's graph is freed once its input gradient is taken, so peak memory is one chunk's; the
    gradient is the same as one forward over all of ``x`` (the loss is a sum over images). Only the
    input gradient is computed: the network's weights are not being optimised.
    """
    outs, grads = [], []
    for i in range(0, len(x), max_images):
        xc = x[i:i + max_images].detach().requires_grad_(True)
        out = ctx.net(xc)
        grad, = torch.autograd.grad(F.cross_entropy(out, target[i:i + max_images], reduction="sum") / per_class, xc)
        outs.append(out.detach())
        grads.append(grad)
    return torch.cat(outs), torch.cat(grads)


def optimise_family(ctx: ModelContext, batch: Batch, num_classes: int, family: str, steps: int = 100,
                    per_class: int = 8, restarts: int = 2, seed: int = 0, success_bar: float = 0.9,
                    lr: float | None = None, mask_init: float = -1.0, max_images: int | None = None,
                    on_step: Callable[[int, int], None] | None = None) -> FamilyResult:
    """The cheapest working trigger of every class in ``family``; see the module docstring.

    ``lr`` overrides the family's default Adam step (``_SCHEDULES``); ``max_images`` caps the
    images per forward. Every class × restart slot is optimised in one step, so a 200-class 64×64
    model would backpropagate 3200 images at once (tens of GiB for a ResNet-18); the default cap is
    ``ctx.images_per_forward(256)`` (256 up to 32×32 — the CIFAR-10 step's 10 classes × 2 restarts ×
    8 = 160 images run in one forward — 64 at 64×64, 5 at 224×224), at least ``per_class``.
    ``on_step(done, steps)`` is called after every step: on a full-width ResNet-18 on two CPU
    cores one step takes seconds, and the service's progress, cancel and time limit act there.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown trigger family {family!r}; one of {FAMILIES}")
    sched = _SCHEDULES[family]
    lr = lr if lr is not None else sched.lr
    g = torch.Generator().manual_seed(seed)
    dev = ctx.device
    x_all, y_all = batch.x, batch.y.cpu()
    k, shape = num_classes, tuple(x_all.shape[1:])
    n = k * restarts  # slot s works for class s % k
    owner = torch.arange(n) % k
    # pools of non-target images per class; a class with none (tiny sets) borrows all images
    pools = [torch.nonzero(y_all != t).flatten() for t in range(k)]
    pools = [p if len(p) else torch.arange(len(y_all)) for p in pools]
    slot_pools = [pools[int(t)] for t in owner]
    slots = _Slots(family, n, shape, g, dev, mask_init)
    opt = torch.optim.Adam(slots.tensors, lr=lr, betas=(0.5, 0.9))
    lam = torch.full((n,), sched.lam_init, device=dev)
    best_cost = torch.full((n,), float("inf"), device=dev)
    best_succ = torch.zeros(n, device=dev)
    best = slots.snapshot()
    target = owner.to(dev).repeat_interleave(per_class)
    max_images = max(per_class, max_images or ctx.images_per_forward(256))
    chunked = n * per_class > max_images
    for step in range(steps):
        idx = torch.stack([p[torch.randint(0, len(p), (per_class,), generator=g)] for p in slot_pools]).to(dev)
        xt, cost = slots.apply(x_all[idx])
        opt.zero_grad()
        if chunked:
            out, x_grad = _logits_with_grad_in_chunks(ctx, xt.flatten(0, 1), target, per_class, max_images)
        else:
            out = ctx.net(xt.flatten(0, 1))
            ce = F.cross_entropy(out, target, reduction="none").view(n, per_class).mean(1)
        with torch.no_grad():  # bookkeeping on the parameters that made this forward, before they move
            succ = (out.argmax(1) == target).float().view(n, per_class).mean(1)
            ok = succ >= success_bar
            better = ok & (cost < best_cost)
            if bool(better.any()):
                best_cost = torch.where(better, cost, best_cost)
                best_succ = torch.where(better, succ, best_succ)
                now = slots.snapshot()
                for name in best:
                    best[name][better] = now[name][better]
            if step >= steps // 10:  # NC's schedule: trade cost for success once the patterns took shape
                lam_next = torch.where(ok, lam * 1.2, lam / 1.2 ** 1.5).clamp(1e-5, sched.lam_max)
            else:
                lam_next = lam
        if chunked:  # the CE part already reached the stamped images; finish through the stamp and the cost
            grads = torch.autograd.grad([xt.flatten(0, 1), (lam * cost).sum()], slots.tensors, [x_grad, None])
        else:
            grads = torch.autograd.grad((ce + lam * cost).sum(), slots.tensors)
        for tensor, grad in zip(slots.tensors, grads):  # only the triggers' gradients: no weight gradients
            tensor.grad = grad
        opt.step()
        lam = lam_next
        if on_step is not None:
            on_step(step + 1, steps)
    slot = best_cost.view(restarts, k).argmin(0) * k + torch.arange(k, device=dev)
    cost, success = best_cost[slot], best_succ[slot]
    never = {"area": float(shape[1] * shape[2]), "one": 1.0, "height": float(shape[1])}[sched.never_cost]
    cost = torch.where(torch.isfinite(cost), cost, torch.full_like(cost, never))
    return FamilyResult(family, cost.cpu(), success.cpu(), {name: v[slot].detach().cpu() for name, v in best.items()})
