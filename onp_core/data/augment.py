"""Training-time augmentation on float batches, shared by subject training and fine-tuning.

One implementation so a defense's fine-tuning sees exactly the augmentation the
subjects were trained with (random crop with zero padding, optional horizontal flip).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, padding: int, hflip: bool, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding + optional random horizontal flip, vectorised (any device).

    The random draws come from the CPU generator ``g`` (crop offsets, then flips), so a
    seed gives the same batch on the CPU and on a GPU.
    """
    n, _, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None]).view(n, 1, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None]).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chans = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = padded[batch, chans, rows, cols]
    if hflip:
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    return x
