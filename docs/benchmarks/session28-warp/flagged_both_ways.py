"""Which classes ONP's first synthesis flags, with which weight, under both anomaly spreads, from the per-family
costs a bench.compare JSON records (``triggers.by_family``). The synthesis does not depend on the spread, so one
run's costs answer for both; where the flagged weights agree, the two repairs are the same. Session 28.

    python docs/benchmarks/session28-warp/flagged_both_ways.py RESULT.json [...]
"""
import json
import sys
from pathlib import Path

import torch

from onp_core.defenses.onp.search import Config
from onp_core.defenses.onp.synth import anomaly_index, anomaly_weights

cfg = Config()
for path in sys.argv[1:]:
    for row in json.loads(Path(path).read_text()):
        if "triggers" not in row:
            continue
        out, top = {}, {}
        for spread in ("all", "lower"):
            z = torch.stack([anomaly_index(torch.tensor(f["cost"]), cfg.anomaly_min_spread, spread)
                             for f in row["triggers"]["by_family"].values()]).max(0).values
            w = anomaly_weights(z, cfg.anomaly_low, cfg.anomaly_high)
            out[spread] = {int(c): round(float(w[c]), 2) for c in w.nonzero().flatten()}
            top[spread] = f"{int(z.argmax())}@{float(z.max()):.2f}"
        same = "same" if out["all"] == out["lower"] else "DIFFERS"
        print(f"{row['subject']:50s} seed {row['seed']}  all {out['all']} (top {top['all']})  "
              f"lower {out['lower']} (top {top['lower']})  {same}")
