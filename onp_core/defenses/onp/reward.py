"""The reward, from clean data only: accuracy − λ_b · backdoor score − λ_s · fraction pruned.

Backdoor scores (trigger-free; each measured on the *pruned* candidate):
- ``unlearn``: target-class dominance of the clean-unlearned model under the same
  mask. Unlearning destroys the clean features but leaves the backdoor shortcut, so a
  backdoored network, once unlearned, sends clean images to one class; pruning the
  backdoor neurons breaks that collapse (the RNP observation, used as a score).
- ``perturb``: class dominance under a one-step adversarial neuron perturbation of
  size ε. A backdoored network collapses to the target class under tiny neuron noise,
  a clean one errs in all directions (the ANP observation, used as a score).
- ``synth``: Σ_k w_k · p_k, the target probability of each suspect class k under its
  trigger synthesised from clean data (synth.py), weighted by how anomalous that
  trigger's area is: pruning the backdoor neurons disables the shortcut the
  synthesised pattern exploits, and a model with no anomalous class scores 0.
- ``combined``: the mean of ``unlearn`` and ``perturb``.
Dominance is the most frequent predicted class's share, rescaled so that a uniform
spread is 0 and a single class is 1.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .context import Batch, ModelContext
from .synth import TriggerSet, triggered_images

SCORES = ("synth", "unlearn", "perturb", "combined")


def dominance(pred: torch.Tensor, num_classes: int) -> float:
    share = torch.bincount(pred, minlength=num_classes).max().item() / max(1, len(pred))
    return (share - 1 / num_classes) / (1 - 1 / num_classes)


class UnlearnedDominance:
    name = "unlearn"

    def __init__(self, unlearned: ModelContext, batch: Batch, num_classes: int):
        self.ctx, self.batch, self.k = unlearned, batch, num_classes

    def __call__(self, keep: torch.Tensor) -> float:
        return dominance(self.ctx.logits(keep, self.batch.x).argmax(1), self.k)


class PerturbationCollapse:
    name = "perturb"

    def __init__(self, ctx: ModelContext, batch: Batch, num_classes: int, eps: float = 0.3, seed: int = 0):
        self.ctx, self.batch, self.k, self.eps = ctx, batch, num_classes, eps
        g = torch.Generator().manual_seed(seed)
        self.start = ((torch.rand(ctx.total, generator=g) * 2 - 1) * eps).to(ctx.device)

    def __call__(self, keep: torch.Tensor) -> float:
        keep = keep.to(self.ctx.device)
        noise = self.start.clone().requires_grad_(True)
        net = self.ctx.net
        net.set_masks(self.ctx.split_flat(keep * (1 + noise)))
        try:
            loss = F.cross_entropy(net(self.batch.x), self.batch.y)
            grad, = torch.autograd.grad(loss, noise)
            adv = (noise + self.eps * grad.sign()).clamp(-self.eps, self.eps).detach()
            with torch.no_grad():
                net.set_masks(self.ctx.split_flat(keep * (1 + adv)))
                pred = net(self.batch.x).argmax(1)
        finally:
            net.set_masks(None)
        return dominance(pred, self.k)


class Combined:
    name = "combined"

    def __init__(self, *scores: Callable[[torch.Tensor], float]):
        self.scores = scores

    def __call__(self, keep: torch.Tensor) -> float:
        return sum(s(keep) for s in self.scores) / len(self.scores)


class SynthesizedTriggerScore:
    """Σ_k w_k · p_k over the suspects' triggered images.

    With ``relative``, each suspect's term is divided by the share of class k's own clean confidence the
    candidate keeps (mean p_k on clean images of class k, against the unpruned model's), capped at 1. A
    candidate can lower p_k under the trigger by cutting the shortcut or by erasing class k itself; the
    second lowers the clean confidence as much and so buys nothing here (docs/ONP.md §1m, §1p).
    """

    name = "synth"

    def __init__(self, ctx: ModelContext, batch: Batch, triggers: TriggerSet, limit: int = 128,
                 relative: bool = False, clean_limit: int = 64):
        self.triggers = triggers
        x, self.owner = triggered_images(triggers, batch, triggers.suspects, limit)
        self.cache = ctx.prefix_cache(x)
        # Σ_k w_k · mean_{rows of k} p_k = Σ_rows row_weight · p_row
        counts = torch.bincount(self.owner, minlength=len(triggers.weights)).clamp_min(1).to(self.owner.device)
        self.row_weight = triggers.weights.to(self.owner.device)[self.owner] / counts[self.owner]
        self.clean_cache = None
        if relative and triggers.suspects:
            own = torch.cat([torch.nonzero(batch.y == k).flatten()[:clean_limit] for k in triggers.suspects])
            if len(own):
                self.clean_owner = batch.y[own]
                self.clean_cache = ctx.prefix_cache(batch.x[own])
                self.clean_ref = self._class_confidence(None).clamp_min(1e-6)

    def _class_confidence(self, keep: torch.Tensor | None) -> torch.Tensor:
        """[classes] mean p_k over the clean images of class k (0 where there are none)."""
        assert self.clean_cache is not None
        p = self.clean_cache.logits(keep).softmax(1).gather(1, self.clean_owner[:, None]).squeeze(1)
        k = len(self.triggers.weights)
        sums = torch.zeros(k, device=p.device).index_add_(0, self.clean_owner, p)
        counts = torch.bincount(self.clean_owner, minlength=k).clamp_min(1)
        return sums / counts

    def __call__(self, keep: torch.Tensor) -> float:
        if len(self.owner) == 0:
            return 0.0
        probs = self.cache.logits(keep).softmax(1).gather(1, self.owner[:, None]).squeeze(1)
        if self.clean_cache is not None:
            kept = (self._class_confidence(keep) / self.clean_ref).clamp(0.05, 1.0)
            probs = (probs / kept[self.owner]).clamp(max=1.0)
        return float((probs * self.row_weight).sum())


def make_score(name: str, ctx: ModelContext, batch: Batch, num_classes: int, triggers: TriggerSet,
               unlearned: Callable[[], ModelContext], eps: float = 0.3, seed: int = 0,
               relative: bool = False) -> Callable[[torch.Tensor], float]:
    """The backdoor score ``name``; ``unlearned`` builds the clean-unlearned model on first need."""
    if name == "synth":
        return SynthesizedTriggerScore(ctx, batch, triggers, relative=relative)
    if name == "unlearn":
        return UnlearnedDominance(unlearned(), batch, num_classes)
    if name == "perturb":
        return PerturbationCollapse(ctx, batch, num_classes, eps, seed)
    if name == "combined":
        return Combined(UnlearnedDominance(unlearned(), batch, num_classes),
                        PerturbationCollapse(ctx, batch, num_classes, eps, seed))
    raise ValueError(f"unknown backdoor score {name!r}; one of {SCORES}")


@dataclass
class RewardInfo:
    reward: float
    acc: float
    backdoor: float
    frac: float


class Reward:
    """reward(keep) on one clean batch; ``keep`` is the flat 1/0 keep-mask over all neurons.

    reward = acc − λ_b·B − λ_s·fraction − λ_drop·max(0, flips − tolerance), where flips
    is the share of clean images whose prediction differs from the unpruned model's.
    The last term is the exchange-rate guard: a planted backdoor is carried by neurons
    the clean task barely needs, so a candidate that buys a lower B by changing more
    than ``tolerance`` of the clean predictions is cutting real features, not a
    backdoor. Flips, not the accuracy difference: fixed and broken images cancel in the
    difference, so a search that maximises over many candidates finds ones whose
    accuracy holds on these images by chance (measured: 1.5 points tolerated on the
    search split became 3.3 points lost on the test set); flips do not cancel.
    Measured on a *clean* Fashion-MNIST model (docs/ONP.md): its shirt class has a
    natural trigger as anomalous as a real one, and without the guard the search paid
    10 points of accuracy to weaken it.

    Optionally (``class_tolerance`` < 1; off by default, measured and not adopted in
    docs/ONP.md §1m) the same slope also applies to ``max(0, worst class loss − class_tolerance)``, where a
    class's loss is the share of the images the unpruned model gave it that the candidate
    no longer does. Overall flips cannot see one class being erased: on the held-out
    Fashion-MNIST Blended subject (target 6, shirt) the search bought the synthesised
    trigger's score by erasing shirt itself (test recall 72 → 14%, 12% of the search
    images flipped) while the planted blend kept 60% ASR (docs/ONP.md §1m). A backdoor's
    neurons carry the shortcut, not the class, so removing them should leave the class's
    clean predictions in place — but on that subject no cheaper set removed the backdoor.
    """

    def __init__(self, ctx: ModelContext, batch: Batch, score: Callable[[torch.Tensor], float],
                 lambda_b: float, lambda_s: float, tolerance: float = 1.0, lambda_drop: float = 0.0,
                 reference: torch.Tensor | None = None, class_tolerance: float = 1.0):
        self.ctx, self.batch, self.score = ctx, batch, score
        self.lambda_b, self.lambda_s = lambda_b, lambda_s
        self.tolerance, self.lambda_drop, self.class_tolerance = tolerance, lambda_drop, class_tolerance
        # flips are counted against ``reference`` (the uploaded model's predictions) so that
        # later repair rounds cannot each spend the tolerance again
        self.pred0 = ctx.logits(None, batch.x).argmax(1) if reference is None else reference
        self.num_classes = int(self.pred0.max()) + 1 if len(self.pred0) else 0
        self.class_counts = torch.bincount(self.pred0, minlength=self.num_classes).clamp_min(1)
        self.cache = ctx.prefix_cache(batch.x)
        self.calls = 0

    def __call__(self, keep: torch.Tensor) -> RewardInfo:
        self.calls += 1
        pred = self.cache.logits(keep).argmax(1)
        acc = float((pred == self.batch.y).float().mean())
        flips = float((pred != self.pred0).float().mean())
        b = self.score(keep)
        frac = float(1 - keep.float().mean())
        excess = max(0.0, flips - self.tolerance)
        if self.class_tolerance < 1:
            excess += max(0.0, self.worst_class_loss(pred) - self.class_tolerance)
        return RewardInfo(acc - self.lambda_b * b - self.lambda_s * frac - self.lambda_drop * excess, acc, b, frac)

    def worst_class_loss(self, pred: torch.Tensor) -> float:
        """The largest share of one class's reference predictions that ``pred`` gives elsewhere."""
        if not self.num_classes:
            return 0.0
        kept = torch.bincount(self.pred0[pred == self.pred0], minlength=self.num_classes)
        loss = (1 - kept / self.class_counts)[self.class_counts >= 5]  # a class seen < 5 times is noise
        return float(loss.max()) if len(loss) else 0.0
