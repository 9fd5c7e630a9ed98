"""Per-family anomaly indices of one subject's synthesis (clean set 100 + SEED, the search split), and with a fifth
argument the breakability weights too. Scratch diagnostic, session 25 (docs/ONP.md §1x).

    PYTHONPATH=. ONP_CACHE_DIR=var/cache python docs/benchmarks/session25-heldout/diag_detect.py PROFILE DATASET ATTACK SEED [b]
"""
import sys, time
import torch
from bench.zoo import load_zoo
from onp_core.data import balanced_subset, load_dataset
from onp_core.defenses.base import clean_splits
from onp_core.defenses.onp.context import Batch, ModelContext
from onp_core.defenses.onp.search import Config, synthesize_as_configured
from onp_core.defenses.onp.breakability import weigh_by_breakability

profile, dataset, attack, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
subject = load_zoo(profile, [dataset], [attack], cached_only=True)[0]
model = subject.model
clean = balanced_subset(load_dataset(dataset, "train"), 500, seed=100 + seed)
cfg = Config(seed=seed)
search_set, _ = clean_splits(clean, cfg)
dev = torch.device("cpu")
search = Batch.from_set(search_set, dev)
ctx = ModelContext(model, dev)
t = time.time()
trig = synthesize_as_configured(ctx, search, model.manifest.num_classes, cfg)  # ONP's repair(), round 1
print(subject.spec.key(), "seed", seed, f"{time.time()-t:.1f}s", "suspects", trig.suspects)
for fam, d in trig.by_family.items():
    print(f"  {fam:6s} anomaly", d["anomaly"])
    print(f"  {fam:6s} cost   ", d["cost"])
if len(sys.argv) > 5 and trig.suspects:
    refs = ctx.logits(None, search.x).argmax(1)
    weighed, halving = weigh_by_breakability(ctx, trig, search, refs, cfg.halving_flips_low, cfg.halving_flips_high)
    print("  weights before", [round(float(w), 3) for w in trig.weights])
    print("  weights after ", [round(float(w), 3) for w in weighed.weights], "halving flips", halving)
