"""What both session-27 diagnostics start from: one zoo subject, ONP's search split of clean set 100 + SEED, the
model's context, and a keep-mask from a ``{layer name: [channels]}`` set as repairs report them."""
import sys
from dataclasses import dataclass

import torch

from bench.zoo import load_zoo
from onp_core.data import balanced_subset, load_dataset
from onp_core.data.dataset import ImageSet
from onp_core.defenses.base import clean_splits
from onp_core.defenses.onp.context import Batch, ModelContext
from onp_core.defenses.onp.search import Config


@dataclass
class Setup:
    subject: object
    clean: ImageSet
    cfg: Config
    search: Batch
    ctx: ModelContext

    def keep_of(self, pruned: dict) -> torch.Tensor:
        names = [layer.name for layer in self.ctx.neurons.layers]
        keep = torch.ones(self.ctx.total)
        for name, chans in pruned.items():
            for c in chans:
                keep[self.ctx.offsets[names.index(name)] + c] = 0
        return keep


def from_argv() -> Setup:
    """PROFILE DATASET ATTACK SEED from the command line."""
    profile, dataset, attack, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    subject = load_zoo(profile, [dataset], [attack], cached_only=True)[0]
    clean = balanced_subset(load_dataset(dataset, "train"), 500, seed=100 + seed)
    cfg = Config(seed=seed)
    search_set, _ = clean_splits(clean, cfg)
    dev = torch.device("cpu")
    return Setup(subject, clean, cfg, Batch.from_set(search_set, dev), ModelContext(subject.model, dev))
