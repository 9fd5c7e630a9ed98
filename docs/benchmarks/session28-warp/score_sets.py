"""ONP's round-1 view of given pruned sets on one subject and clean set: the synthesised-trigger score the search
weighs, the flips on the search split, and (for the record only) test ACC and ASR. Scratch diagnostic, session 28.

    PYTHONPATH=.:docs/benchmarks/session27-blend ONP_CACHE_DIR=var/cache \
        python docs/benchmarks/session28-warp/score_sets.py PROFILE DATASET ATTACK SEED '{"layer": [ch, ...]}' ...
"""
import json
import sys

from subject_setup import from_argv

from onp_core.defenses.onp.breakability import weigh_by_breakability
from onp_core.defenses.onp.reward import SynthesizedTriggerScore
from onp_core.defenses.onp.search import synthesize_as_configured

setup = from_argv()
subject, cfg, search, ctx = setup.subject, setup.cfg, setup.search, setup.ctx
test, triggered = subject.test_sets()
target = subject.attack.target
clean_cache, trig_cache = ctx.prefix_cache(test.float()), ctx.prefix_cache(triggered.float())
ref = ctx.logits(None, search.x).argmax(1)
search_cache = ctx.prefix_cache(search.x)
trig = synthesize_as_configured(ctx, search, subject.model.manifest.num_classes, cfg)
if trig.suspects:
    trig, halving = weigh_by_breakability(ctx, trig, search, ref, cfg.halving_flips_low, cfg.halving_flips_high)
    print("halving flips", halving)
print("suspects", trig.suspects, "weights", [round(float(w), 2) for w in trig.weights])
score = SynthesizedTriggerScore(ctx, search, trig)
for text in ["{}"] + sys.argv[5:]:
    pruned = json.loads(text)
    keep = setup.keep_of(pruned)
    acc = float((clean_cache.logits(keep).argmax(1) == test.labels).float().mean())
    asr = float((trig_cache.logits(keep).argmax(1) == target).float().mean())
    pred = search_cache.logits(keep).argmax(1)
    flips = float((pred != ref).float().mean())
    broken = float(((pred != ref) & (ref == search.y)).float().mean())  # right → wrong only
    print(f"n={int((keep == 0).sum()):3d} synth={score(keep):.3f} flips={flips:.3f} broken={broken:.3f} "
          f"ACC={100 * acc:.2f} "
          f"ASR={100 * asr:.2f}  {text}", flush=True)
