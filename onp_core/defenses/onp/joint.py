"""Joint pruning scores: one soft mask over all neurons, optimised against the suspects' triggers.

Leave-one-out (``effects.py``) sees one neuron at a time. A shortcut carried by several
neurons that back each other up shows no large single drop, so the imitation prior never
points at them and the search rarely samples the whole set. Here a mask m = sigmoid(θ)
over every neuron starts near 1 and is trained, like ANP's and RNP's masks, but on the
evidence ONP has: it lowers the suspects' weighted target probability on their
synthesised-trigger images while the clean images keep the unpruned model's predictions
(KL). 1 − m after a fixed number of steps ranks the neurons by their joint share in the
shortcut; the search turns the ranking into candidates, and the reward decides, as for
every other candidate, whether any of them is worth its clean flips.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .context import Batch, ModelContext
from .effects import strong_suspect_images
from .synth import TriggerSet


def joint_mask_scores(ctx: ModelContext, triggers: TriggerSet, batch: Batch, steps: int = 100, lr: float = 0.1,
                      clean_weight: float = 1.0, images: int = 128) -> torch.Tensor:
    """[total] scores in [0, 1]: 1 − the jointly optimised keep-mask (0 for every neuron when no suspect)."""
    x_trig, t_trig, w_trig = strong_suspect_images(triggers, batch, images)
    if len(x_trig) == 0 or steps == 0:
        return torch.zeros(ctx.total)
    x_clean = batch.x[:images]
    with torch.no_grad():
        ref = ctx.logits(None, x_clean, exact=True).log_softmax(1)
    theta = torch.full((ctx.total,), 3.0, device=ctx.device, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    net = ctx.net
    try:
        for _ in range(steps):
            mask = torch.sigmoid(theta)
            net.set_masks(ctx.split_flat(mask))
            target_prob = net(x_trig).softmax(1).gather(1, t_trig[:, None]).squeeze(1)
            backdoor = (target_prob * w_trig).sum()
            drift = F.kl_div(net(x_clean).log_softmax(1), ref, log_target=True, reduction="batchmean")
            loss = backdoor + clean_weight * drift
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        net.set_masks(None)
    return (1 - torch.sigmoid(theta.detach())).cpu()
