"""Which pruned sets cut a subject's planted backdoor, and what ONP's own signals say about each. Scratch diagnostic,
session 27 (docs/ONP.md §1y). Reads the attack only to *report* ASR, as bench.frontier does.

    PYTHONPATH=. ONP_CACHE_DIR=var/cache python docs/benchmarks/session27-blend/diag_sets.py PROFILE DATASET ATTACK SEED

For ONP's repair, CLP's and each of ONP's rounds: neurons, synthesised-trigger score (round-1 triggers as the search
weighs them), flips on the search split, test ACC and ASR.
"""
import json
import sys
import time

from subject_setup import from_argv

from onp_core.defenses import run_repair
from onp_core.defenses.onp.breakability import weigh_by_breakability
from onp_core.defenses.onp.reward import SynthesizedTriggerScore
from onp_core.defenses.onp.search import synthesize_as_configured

setup = from_argv()
subject, clean, cfg, search, ctx = setup.subject, setup.clean, setup.cfg, setup.search, setup.ctx
model, seed, keep_of = subject.model, cfg.seed, setup.keep_of
test, triggered = subject.test_sets()
target = subject.attack.target
clean_cache, trig_cache = ctx.prefix_cache(test.float()), ctx.prefix_cache(triggered.float())
ref = ctx.logits(None, search.x).argmax(1)
search_cache = ctx.prefix_cache(search.x)


trig = synthesize_as_configured(ctx, search, model.manifest.num_classes, cfg)
if trig.suspects:
    trig, halving = weigh_by_breakability(ctx, trig, search, ref, cfg.halving_flips_low, cfg.halving_flips_high)
    print("halving flips", halving)
print("suspects", trig.suspects, "weights", [round(float(w), 2) for w in trig.weights],
      "families", [trig.family[k] for k in trig.suspects], "costs", [round(float(trig.cost[k]), 3) for k in trig.suspects])
score = SynthesizedTriggerScore(ctx, search, trig) if trig.suspects else (lambda keep: 0.0)


def line(label: str, pruned: dict) -> None:
    keep = keep_of(pruned)
    acc = float((clean_cache.logits(keep).argmax(1) == test.labels).float().mean())
    asr = float((trig_cache.logits(keep).argmax(1) == target).float().mean())
    flips = float((search_cache.logits(keep).argmax(1) != ref).float().mean())
    print(f"{label:28s} n={int((keep == 0).sum()):3d} synth={score(keep):.3f} flips={flips:.3f} "
          f"ACC={100 * acc:.2f} ASR={100 * asr:.2f}  {json.dumps(pruned)}")


line("upload", {})
for method in sys.argv[5:] or ["onp", "clp"]:
    t = time.time()
    res = run_repair(model, clean, method, {"seed": seed})
    line(f"{method} ({time.time() - t:.0f}s)", res.pruned)
    if method == "onp":
        for r in res.details["rounds"]:
            print("  round", r["round"], "pruned", r.get("pruned"), "selected", r.get("selected"),
                  "score before", r.get("backdoor_score_before"))
            for f in r.get("reattacks", []):
                print("  reattack", f.get("evidence"), "pruned", f.get("pruned"), "selected", f.get("selected"),
                      "score before", f.get("backdoor_score_before"))
        print("  dormant", res.details["dormant"])
