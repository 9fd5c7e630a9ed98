"""The cpu profile's ONP means under each anomaly spread, from this session's JSONs. Where a run's flagged classes and
weights agree under both spreads (``flagged_both_ways.py``), its one run stands for both. Session 28.

    python docs/benchmarks/session28-warp/means.py
"""
import json
import statistics
from pathlib import Path

here = Path(__file__).parent


def rows(pattern: str) -> dict:
    out = {}
    for path in sorted(here.glob(pattern)):
        for r in json.loads(path.read_text()):
            if r["method"] == "onp" and r["asr"] is not None:
                out[(r["subject"], r["seed"])] = r
    return out


lower = rows("lower-cpu-*.json")
whole = {**lower, **rows("all-cpu-*.json")}  # lower runs whose flags agree stand for "all" unless rerun
for name, runs in (("all (default)", whole), ("lower", lower)):
    d_acc = [100 * (r["acc"] - r["acc_before"]) for r in runs.values()]
    asr = [100 * r["asr"] for r in runs.values()]
    der = [100 * r["der"] for r in runs.values()]
    print(f"{name:14s} runs {len(runs)}  ΔACC {statistics.mean(d_acc):+.2f} ± {statistics.stdev(d_acc):.2f}  "
          f"ASR {statistics.mean(asr):.2f} ± {statistics.stdev(asr):.2f}  DER {statistics.mean(der):.2f} ± "
          f"{statistics.stdev(der):.2f}")
for key in sorted(lower):
    a, b = whole[key], lower[key]
    print(f"{key[0].split('-')[2] + ' ' + key[0].split('-')[3]:24s} set {100 + key[1]}  all {100 * a['acc']:.2f} / {100 * a['asr']:.2f} ({a['pruned']})"
          f"  lower {100 * b['acc']:.2f} / {100 * b['asr']:.2f} ({b['pruned']})")
