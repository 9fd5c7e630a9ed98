"""Every family's per-class costs on one subject and clean set, and the anomaly index two ways: the robust z-score
of now (one MAD over all classes) and the same z with the spread taken from the classes at or below the median
only (the lower half's MAD). Scratch probe, session 28 (docs/ONP.md §1z); reads no trigger and no poisoned data.

    PYTHONPATH=.:docs/benchmarks/session27-blend ONP_CACHE_DIR=var/cache \
        python docs/benchmarks/session28-warp/synth_indices.py PROFILE DATASET ATTACK SEED
"""
import json
import sys

import torch
from subject_setup import from_argv

from onp_core.defenses.onp.families import optimise_family
from onp_core.defenses.onp.synth import anomaly_index, anomaly_weights

setup = from_argv()
cfg, ctx, search = setup.cfg, setup.ctx, setup.search
k = setup.subject.model.manifest.num_classes
out = {"subject": sys.argv[1:5], "families": {}}
z_now, z_low = [], []
for i, fam in enumerate(cfg.synth_families):
    restarts = cfg.mask_restarts if fam == "mask" else cfg.synth_restarts
    # the seed synthesize_triggers gives the i-th family
    res = optimise_family(ctx, search, k, fam, cfg.synth_steps, cfg.synth_per_class, restarts, cfg.seed + i, 0.9)
    a = anomaly_index(res.cost, cfg.anomaly_min_spread, spread="all")
    b = anomaly_index(res.cost, cfg.anomaly_min_spread, spread="lower")
    z_now.append(a)
    z_low.append(b)
    out["families"][fam] = {"cost": [round(float(c), 3) for c in res.cost], "z": [round(float(v), 2) for v in a],
                            "z_lower": [round(float(v), 2) for v in b]}
    print(f"{fam:5s} cost " + " ".join(f"{float(c):6.3f}" for c in res.cost), flush=True)
    print("      z    " + " ".join(f"{float(v):6.2f}" for v in a))
    print("      zlow " + " ".join(f"{float(v):6.2f}" for v in b), flush=True)
for name, zs in (("now", z_now), ("lower", z_low)):
    z = torch.stack(zs).max(0).values
    w = anomaly_weights(z, cfg.anomaly_low, cfg.anomaly_high)
    flagged = {int(c): round(float(w[c]), 2) for c in w.nonzero().flatten()}
    out[name] = flagged
    print(f"{name:6s} flagged (class: weight) {flagged}")
print("JSON", json.dumps(out))
