"""ONP ablations on cached subjects: each variant against the default, same clean data and seed.

    .venv/bin/python -m bench.ablation [--datasets cifar10 fashion_mnist] [--attacks badnets] [--seeds 0]
        [--variants default mlp greedy no_effects uniform_start]

Variants (each is ONP's Config with one change; see docs/ONP.md):
- ``mlp``: the encoder without message passing (same node features);
- ``greedy``: no RL, neurons ranked by the leave-one-out drop and the count swept by reward;
- ``no_effects``: node features without the leave-one-out effects (activation, BN, CLP, gain only);
- ``uniform_start``: RL without the imitation warm start;
- ``no_activation`` / ``no_bn`` / ``no_weights`` / ``no_gain``: one node-feature group left out
  (activation statistics; BN γ/β; ‖q‖₁ and the CLP bound; the trigger activation gain).
Writes docs/benchmarks/ablation.{md,json}; ASR is only reported, never used by ONP.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from onp_core.defenses.onp.features import FEATURE_NAMES
from onp_core.defenses.onp.search import DEFAULT_FEATURES

from .compare import merge_results, merged_note, run_one
from .zoo import load_zoo

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "mlp": {"encoder": "mlp"},
    "greedy": {"policy": "greedy"},
    "no_effects": {"features": tuple(f for f in DEFAULT_FEATURES if "drop" not in f and "loss_rise" not in f)},
    "uniform_start": {"imitation_steps": 0},
    # one feature group left out at a time
    "no_activation": {"features": tuple(f for f in DEFAULT_FEATURES if not f.startswith("act_"))},
    "no_bn": {"features": tuple(f for f in DEFAULT_FEATURES if not f.startswith("bn_"))},
    "no_weights": {"features": tuple(f for f in DEFAULT_FEATURES if f not in ("q_norm", "clp_bound"))},
    "no_gain": {"features": tuple(f for f in DEFAULT_FEATURES if not f.startswith("trigger_gain"))},
}
assert all(set(v.get("features", ())) <= set(FEATURE_NAMES) for v in VARIANTS.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "fashion_mnist"])
    parser.add_argument("--attacks", nargs="+", default=["badnets"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--merge", nargs="*", type=Path, default=[],
                        help="earlier ablation JSONs to include in the tables (a run of the same subject, variant and "
                             "seed here replaces theirs): subjects run as separate jobs, one table")
    args = parser.parse_args()
    rows = []
    for subject in load_zoo("cpu", args.datasets, args.attacks, cached_only=True):
        for seed in args.seeds:
            for variant in args.variants:
                row = run_one(subject, "onp", seed, 500, {"onp": VARIANTS[variant]})
                row["variant"] = variant
                rows.append(row)
                print(f"{row['subject']} seed {seed} {variant}: ACC {row['acc']:.4f} ASR {row['asr']:.4f} "
                      f"DER {row['der']:.4f} pruned {row['pruned']} {row['seconds']:.1f}s", flush=True)
    rows = merge_results(rows, args.merge, "variant")
    merged = merged_note(args.merge)
    lines = [f"## ONP ablations — torch {torch.__version__}, {torch.get_num_threads()} threads",
             "", f"Command: `python -m bench.ablation --datasets {' '.join(args.datasets)} --attacks "
             f"{' '.join(args.attacks)} --seeds {' '.join(map(str, args.seeds))}`{merged}", "",
             "| subject | variant | ACC before | ACC | ASR before | ASR | DER | pruned | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} {r['attack']} | {r['variant']} | {100 * r['acc_before']:.2f} | "
                     f"{100 * r['acc']:.2f} | {100 * r['asr_before']:.2f} | {100 * r['asr']:.2f} | "
                     f"{100 * r['der']:.2f} | {r['pruned']} | {r['seconds']:.0f} |")
    lines += ["", "| variant | mean DER | mean ΔACC (points) | mean ASR |", "|---|---|---|---|"]
    for v in dict.fromkeys([*args.variants, *(r["variant"] for r in rows)]):
        rs = [r for r in rows if r["variant"] == v]
        if rs:
            lines.append(f"| {v} | {100 * statistics.mean(r['der'] for r in rs):.2f} | "
                         f"{100 * statistics.mean(r['acc'] - r['acc_before'] for r in rs):.2f} | "
                         f"{100 * statistics.mean(r['asr'] for r in rs):.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=2))
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
