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
from .synth import TriggerSet, target_probability

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
    name = "synth"

    def __init__(self, ctx: ModelContext, batch: Batch, triggers: TriggerSet, limit: int = 128):
        self.ctx, self.batch, self.triggers, self.limit = ctx, batch, triggers, limit

    def __call__(self, keep: torch.Tensor) -> float:
        probs = target_probability(self.ctx, self.triggers, self.batch, keep, limit=self.limit)
        return sum(float(self.triggers.weights[k]) * p for k, p in probs.items())


def make_score(name: str, ctx: ModelContext, batch: Batch, num_classes: int, triggers: TriggerSet,
               unlearned: Callable[[], ModelContext], eps: float = 0.3, seed: int = 0) -> Callable[[torch.Tensor], float]:
    """The backdoor score ``name``; ``unlearned`` builds the clean-unlearned model on first need."""
    if name == "synth":
        return SynthesizedTriggerScore(ctx, batch, triggers)
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
    """reward(keep) on one clean batch; ``keep`` is the flat 1/0 keep-mask over all neurons."""

    def __init__(self, ctx: ModelContext, batch: Batch, score: Callable[[torch.Tensor], float],
                 lambda_b: float, lambda_s: float):
        self.ctx, self.batch, self.score = ctx, batch, score
        self.lambda_b, self.lambda_s = lambda_b, lambda_s
        self.calls = 0

    def __call__(self, keep: torch.Tensor) -> RewardInfo:
        self.calls += 1
        acc = self.ctx.accuracy(keep, self.batch)
        b = self.score(keep)
        frac = float(1 - keep.float().mean())
        return RewardInfo(acc - self.lambda_b * b - self.lambda_s * frac, acc, b, frac)
