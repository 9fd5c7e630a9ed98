"""How the warp family's per-class costs and anomaly indices move with the synthesis's settings. Scratch probe,
session 28 (docs/ONP.md §1z). Reads no trigger and no poisoned data: only the synthesis on clean set 100 + SEED.

    PYTHONPATH=.:docs/benchmarks/session27-blend ONP_CACHE_DIR=var/cache \
        python docs/benchmarks/session28-warp/probe_warp.py PROFILE DATASET ATTACK SEED [VARIANT ...]

A VARIANT is name=bar,restarts,per_class,steps (default: the configured 0.9,2,8,100). The warp family is
optimised with the seed the full synthesis gives it (cfg.seed + its index in FAMILIES).
"""
import sys
import time

from subject_setup import from_argv

from onp_core.defenses.onp.families import FAMILIES, optimise_family
from onp_core.defenses.onp.synth import anomaly_index

setup = from_argv()
cfg, ctx, search = setup.cfg, setup.ctx, setup.search
k = setup.subject.model.manifest.num_classes
family = "warp"
variants = sys.argv[5:] or ["default=0.9,2,8,100"]
for v in variants:
    name, spec = v.split("=")
    bar, restarts, per_class, steps = spec.split(",")
    t = time.time()
    res = optimise_family(ctx, search, k, family, int(steps), int(per_class), int(restarts),
                          cfg.seed + FAMILIES.index(family), float(bar))
    z = anomaly_index(res.cost, cfg.anomaly_min_spread)
    top = z.argsort(descending=True)[:3].tolist()
    print(f"{name:10s} {time.time() - t:5.0f}s cost " + " ".join(f"{float(c):5.2f}" for c in res.cost)
          + " | z " + " ".join(f"{float(a):5.2f}" for a in z) + f" | top {top}", flush=True)
