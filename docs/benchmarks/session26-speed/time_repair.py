"""Time a default ONP repair on one cpu-profile subject (clean set 100 + SEED), with its phases. Session 25 (reused in session 26).

    OMP_NUM_THREADS=2 PYTHONPATH=. ONP_CACHE_DIR=var/cache python docs/benchmarks/session26-speed/time_repair.py DATASET ATTACK SEED [CONFIG_JSON]
"""
import sys, time, json, torch
from bench.zoo import load_zoo
from onp_core.data import balanced_subset, load_dataset
from onp_core.defenses.onp.search import Config, repair
from onp_core.metrics import evaluate
ds, atk, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
kw = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
s = load_zoo("cpu", [ds], [atk], cached_only=True)[0]
clean = balanced_subset(load_dataset(ds, "train"), 500, seed=100 + seed)
t = time.perf_counter()
r = repair(s.model, clean, Config(seed=seed, **kw))
wall = time.perf_counter() - t
test, trig = s.test_sets()
m = evaluate(r.model, test, trig, s.attack.target)
print(f"{ds} {atk} seed {seed} threads {torch.get_num_threads()} {kw}: {wall:.1f} s  ACC {100*m.acc:.2f} ASR {100*m.asr:.2f} pruned {sum(len(v) for v in r.pruned.values())}")
print("  ", r.details["timing"])
