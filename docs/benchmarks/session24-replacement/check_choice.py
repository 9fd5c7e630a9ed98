"""Can a trigger-free check tell a held-down repair from a cut? Suspects' synthesised triggers, re-attacked on the
zeroed and on the constant-replaced network (clean-mean constants). usage: check_choice.py DATASET ATTACK SEED"""
import json
import sys

import torch

from bench.replacement import clean_means, with_constants
from bench.zoo import load_zoo
from onp_core.data import balanced_subset, load_dataset
from onp_core.defenses.base import clean_splits
from onp_core.defenses.common import Tensors
from onp_core.defenses.onp.context import Batch, ModelContext
from onp_core.defenses.onp.reattack import reattack
from onp_core.defenses.onp.search import Config, synthesize_as_configured
from onp_core.neurons.discover import discover_neurons

dataset, attack, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
subject = load_zoo("cpu", [dataset], [attack], cached_only=True)[0]
rows = json.load(open("docs/benchmarks/session24-compare/cpu.json"))
row = next(r for r in rows if r["subject"] == subject.spec.key() and r["method"] == "onp" and r["seed"] == seed)
model = subject.model
neurons = discover_neurons(model, tuple(model.manifest.input_shape))
index = {l.name: i for i, l in enumerate(neurons.layers)}
pruned = {index[n]: ch for n, ch in row["neurons"].items()}
clean = balanced_subset(load_dataset(dataset, "train"), 500, seed=100 + seed)
cfg = Config(seed=seed)
search_set, _ = clean_splits(clean, cfg)
dev = torch.device("cpu")
search = Batch.from_set(search_set, dev)
ctx0 = ModelContext(model, dev)
trig = synthesize_as_configured(ctx0, search, model.manifest.num_classes, cfg)
print(subject.spec.key(), seed, "suspects", trig.suspects, "families", [trig.family[k] for k in trig.suspects],
      flush=True)
means = clean_means(neurons, pruned, Tensors.of(clean, dev))
for name, consts in (("zero", None), ("clean mean", means)):
    m = with_constants(model, neurons, pruned, consts)
    ctx = ModelContext(m, dev)
    _, evidence = reattack(ctx, trig, search, 50, 1.0, rivals=2)
    print(f"  {name:>10}: " + "; ".join(f"class {k}: " + ", ".join(f"{a} {v:.3f}" for a, v in e.items())
                                        for k, e in evidence.items()), flush=True)
