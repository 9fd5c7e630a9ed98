"""Check that session 26's speed changes leave every ONP repair of the cpu profile as session 24 made it. Session 26.

    python docs/benchmarks/session26-speed/same_repairs.py NEW.json [NEW.json ...]

Compares, per subject and clean set, the pruned neurons, test ACC and ASR with
docs/benchmarks/session24-compare/cpu.json (same subjects, same defaults, code before session 26),
and prints both runs' wall seconds.
"""
import json
import sys
from pathlib import Path

old = {(r["subject"], r["seed"]): r for r in json.loads(Path("docs/benchmarks/session24-compare/cpu.json").read_text())
       if r["method"] == "onp"}
same = 0
rows = [r for p in sys.argv[1:] for r in json.loads(Path(p).read_text()) if r["method"] == "onp"]
for r in sorted(rows, key=lambda r: (r["subject"], r["seed"])):
    o = old[(r["subject"], r["seed"])]
    ok = r["neurons"] == o["neurons"] and abs(r["acc"] - o["acc"]) < 1e-9 and abs(r["asr"] - o["asr"]) < 1e-9
    same += ok
    print(f"{r['subject']:48s} set {r['seed']}: {'same' if ok else 'DIFFERENT'}  ACC {100*r['acc']:.2f} ASR {100*r['asr']:.2f}"
          f"  {r['pruned']} neurons  {o['seconds']:.1f} s -> {r['seconds']:.1f} s")
print(f"{same} of {len(rows)} repairs identical to session 24's")
