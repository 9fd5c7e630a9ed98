"""How a synthesised trigger's hit rate and target probability depend on the strength it is stamped at, on the upload
and on given pruned sets, beside the planted trigger's ASR (reported only). Scratch diagnostic, session 27.

    PYTHONPATH=. ONP_CACHE_DIR=var/cache python docs/benchmarks/session27-blend/probe_boost.py PROFILE DATASET ATTACK SEED \
        'LABEL={"layer": [channels]}' ...
"""
import json
import sys

from subject_setup import from_argv

from onp_core.defenses.onp.families import stamp
from onp_core.defenses.onp.search import synthesize_as_configured

setup = from_argv()
subject, cfg, search, ctx, keep_of = setup.subject, setup.cfg, setup.search, setup.ctx, setup.keep_of
model = subject.model
test, triggered = subject.test_sets()
target = subject.attack.target
trig_cache = ctx.prefix_cache(triggered.float()[:2000])
clean_cache = ctx.prefix_cache(test.float()[:2000])
trig = synthesize_as_configured(ctx, search, model.manifest.num_classes, cfg)
print("suspects", trig.suspects, "anomaly", [round(float(a), 2) for a in trig.anomaly])


sets = [("upload", {})] + [(a.split("=", 1)[0], json.loads(a.split("=", 1)[1])) for a in sys.argv[5:]]
for k in trig.suspects or [target]:
    fam, params = trig.family[k], trig.params[k]
    x = search.x[search.y != k][:128]
    print(f"class {k} family {fam} cost {float(trig.cost[k]):.3f}")
    for label, pruned in sets:
        keep = keep_of(pruned)
        asr = float((trig_cache.logits(keep).argmax(1) == target).float().mean())
        acc = float((clean_cache.logits(keep).argmax(1) == test.labels[:2000]).float().mean())
        cells = []
        for mult in (1.0, 1.5, 2.0, 3.0, "sqrt", 5.0):
            p = dict(params)
            if fam == "warp":
                p["flow"] = params["flow"] * (1.5 if mult == "sqrt" else mult)
            else:
                p["mask"] = params["mask"].sqrt() if mult == "sqrt" else (params["mask"] * mult).clamp(max=1)
            out = ctx.logits(keep, stamp(fam, p, x, boost=False)).float().softmax(1)
            cells.append(f"{mult}: {float((out.argmax(1) == k).float().mean()):.2f}/{float(out[:, k].mean()):.2f}")
        print(f"  {label:10s} ACC {100 * acc:.1f} ASR {100 * asr:.1f} | hit/prob " + "  ".join(cells))
