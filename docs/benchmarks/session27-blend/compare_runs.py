"""Run by run, two sets of bench.compare JSON on the same subjects: ACC / ASR, DER and neurons pruned, "same" where
the same neurons were pruned, and the means of ΔACC, ASR and DER. Session 27.

    python docs/benchmarks/session27-blend/compare_runs.py OLD.json[,OLD2.json] NEW.json[,NEW2.json]
"""
import json
import sys
from pathlib import Path


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


old = {(r["subject"], r["method"], r["seed"]): r for f in sys.argv[1].split(",")
       for r in json.loads(Path(f).read_text())}
totals: dict[str, list[tuple[float, float, float]]] = {"old": [], "new": []}
for f in sys.argv[2].split(","):
    for r in json.loads(Path(f).read_text()):
        if r["method"] == "none":
            continue
        o = old.get((r["subject"], r["method"], r["seed"]))
        if o is None:
            print("no old run for", r["subject"], r["seed"])
            continue
        same = "same" if o["neurons"] == r["neurons"] else ""
        print(f'{r["subject"]:55s} set {100 + r["seed"]}  old {pct(o["acc"])} / {pct(o["asr"])} '
              f'DER {pct(o["der"])} ({o["pruned"]})  new {pct(r["acc"])} / {pct(r["asr"])} '
              f'DER {pct(r["der"])} ({r["pruned"]}) {same}')
        if r["asr"] is None:  # a clean model: no ASR or DER to average
            continue
        for key, run in (("old", o), ("new", r)):
            totals[key].append((100 * (run["acc"] - run["acc_before"]), 100 * run["asr"], 100 * run["der"]))
for key, rows in totals.items():
    if rows:
        n = len(rows)
        print(f"{key}: {n} runs, mean ΔACC {sum(t[0] for t in rows) / n:.2f}, ASR {sum(t[1] for t in rows) / n:.2f}, "
              f"DER {sum(t[2] for t in rows) / n:.2f}")
