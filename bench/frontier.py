"""REFERENCE ONLY — how far pruning alone can go on a subject when the choice may look at the attack.

    .venv/bin/python -m bench.frontier [--profile cpu] [--datasets cifar10 fashion_mnist] [--attacks badnets ...]
        [--steps 8] [--choose 500] [--out docs/benchmarks/frontier] [--compare cpu.json] [--merge frontier.json]

Issue 4's goal (ACC loss ≤ 1 point, ASR ≤ 2%) asks something of the *subject* as well as of the
defense: on a network whose backdoor shares neurons with clean features, no set of pruned neurons
may reach it. This oracle says where that bar lies. It prunes greedily, one neuron per step, the
neuron whose removal most lowers ASR + ACC loss (DER's own exchange rate: DER = (ΔASR − ΔACC + 1)/2)
measured on ``choose`` clean and ``choose`` triggered *test* images, and reports every step on the
rest of the test set, which the choice never saw. It reads the attack's triggered images to choose,
so it is an upper reference for pruning defenses on that subject, never a defense: nothing in
``onp_core`` calls it. Greedy is not optimal, so a goal it misses may still be reachable by some set;
a goal it meets is reachable. Writes ``<out>/frontier.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path
from typing import Any

import torch

from onp_core.data.dataset import ImageSet
from onp_core.defenses.onp.context import ModelContext

from .zoo import ATTACKS, PROFILES, load_zoo


def _split(data: ImageSet, choose: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y) of ``choose`` images to choose on, (x, y) of the rest to report on; one fixed permutation."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    x, y = data.float(), data.labels
    pick, rest = order[:choose], order[choose:]
    return x[pick], y[pick], x[rest], y[rest]


class _Scorer:
    """ACC and ASR of a keep-mask on one clean and one triggered image set (float32, prefix reuse)."""

    def __init__(self, ctx: ModelContext, clean_x: torch.Tensor, clean_y: torch.Tensor, trig_x: torch.Tensor,
                 target: int):
        self.clean, self.trig = ctx.prefix_cache(clean_x), ctx.prefix_cache(trig_x)
        self.clean_y, self.target = clean_y, target

    def __call__(self, keep: torch.Tensor) -> tuple[float, float]:
        acc = float((self.clean.logits(keep).argmax(1) == self.clean_y).float().mean())
        asr = float((self.trig.logits(keep).argmax(1) == self.target).float().mean())
        return acc, asr


def frontier(subject: Any, steps: int, choose: int, seed: int = 0) -> dict[str, Any]:
    """The greedy oracle path of one subject; see the module docstring."""
    test, triggered = subject.test_sets()
    target = subject.attack.target
    cx, cy, rx, ry = _split(test, choose, seed)
    tx, _, trx, _ = _split(triggered, choose, seed + 1)
    ctx = ModelContext(subject.model, torch.device("cpu"))  # float32: these are reported numbers
    choose_on, report_on = _Scorer(ctx, cx, cy, tx, target), _Scorer(ctx, rx, ry, trx, target)
    keep = torch.ones(ctx.total)
    acc0, _ = choose_on(keep)
    racc0, rasr0 = report_on(keep)
    path = [{"step": 0, "neuron": None, "acc": racc0, "asr": rasr0, "der": 0.5}]
    names = [(layer.name, c) for layer in ctx.neurons.layers for c in range(layer.size)]
    for step in range(1, steps + 1):
        best, best_value, best_asr = None, float("inf"), 1.0
        for i in torch.nonzero(keep).flatten().tolist():
            trial = keep.clone()
            trial[i] = 0
            acc, asr = choose_on(trial)
            value = asr + max(0.0, acc0 - acc)
            if value < best_value:
                best, best_value, best_asr = i, value, asr
        keep[best] = 0
        acc, asr = report_on(keep)
        der = (max(0.0, rasr0 - asr) - max(0.0, racc0 - acc) + 1) / 2
        path.append({"step": step, "neuron": f"{names[best][0]}:{names[best][1]}", "acc": acc, "asr": asr, "der": der})
        print(f"  {subject.spec.key()} step {step}: {path[-1]['neuron']} ACC {100 * acc:.2f} ASR {100 * asr:.2f} "
              f"DER {100 * der:.2f}", flush=True)
        if best_asr <= 0.005:  # nothing left to remove on the choice images
            break
    goal = [p for p in path if racc0 - p["acc"] <= 0.01 and p["asr"] <= 0.02]
    return {"subject": subject.spec.key(), "dataset": subject.spec.dataset, "attack": subject.spec.attack_label(),
            "choose": choose, "report_images": len(ry), "report_triggered": len(trx), "path": path,
            "best": max(path, key=lambda p: p["der"]), "goal_reached_at": goal[0]["step"] if goal else None}


def _method_means(rows: list[dict[str, Any]], method: str) -> dict[str, tuple[float, float, float]]:
    """Per subject: a defense's mean ACC before, ACC and ASR after over its seeds (``bench.compare`` rows)."""
    out = {}
    for key in {r["subject"] for r in rows if r["method"] == method}:
        rs = [r for r in rows if r["subject"] == key and r["method"] == method]
        out[key] = tuple(sum(r[k] for r in rs) / len(rs) for k in ("acc_before", "acc", "asr"))
    return out


def markdown(results: list[dict[str, Any]], header: str, compare: list[dict[str, Any]] | None = None,
             method: str = "onp") -> str:
    means = _method_means(compare, method) if compare is not None else None
    cols = ["subject", "before ACC / ASR", "best DER on the report images (step: ACC / ASR)",
            "goal (ΔACC ≤ 1, ASR ≤ 2%) reached at step", "ASR at ΔACC ≤ 1 (fewest-ASR step)"]
    if means is not None:
        cols += [f"{method} ACC / ASR (mean of its seeds, full test set)", f"oracle ASR at {method}'s ACC cost"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        p0, best = r["path"][0], r["best"]
        within = [p for p in r["path"] if p0["acc"] - p["acc"] <= 0.01]
        low = min(within, key=lambda p: p["asr"])
        row = (f"| {r['dataset']} {r['attack']} | {100 * p0['acc']:.2f} / {100 * p0['asr']:.2f} | "
               f"{100 * best['der']:.2f} ({best['step']}: {100 * best['acc']:.2f} / {100 * best['asr']:.2f}) | "
               f"{r['goal_reached_at'] if r['goal_reached_at'] is not None else 'not within the path'} | "
               f"{100 * low['asr']:.2f} (step {low['step']}) |")
        if means is not None:
            m = means.get(r["subject"])
            if m is None:
                row += " — | — |"
            else:  # the oracle at the defense's own accuracy cost (points measured on different test images)
                cost = m[0] - m[1]
                at = [p for p in r["path"] if p0["acc"] - p["acc"] <= max(cost, 0.0)]
                row += (f" {100 * m[1]:.2f} / {100 * m[2]:.2f} (ΔACC {-100 * cost:+.2f}) | "
                        f"{100 * min(p['asr'] for p in at):.2f} |")
        lines.append(row)
    bests = [(r["path"][0]["acc"], r["best"]) for r in results]
    if bests:
        n = len(bests)
        lines += ["", f"At each subject's best-DER step, over the {n} subjects: mean ΔACC "
                  f"{-100 * sum(a0 - b['acc'] for a0, b in bests) / n:+.2f} points, mean ASR "
                  f"{100 * sum(b['asr'] for _, b in bests) / n:.2f}%, mean DER {100 * sum(b['der'] for _, b in bests) / n:.2f}."]
    lines += ["", "Paths (step: neuron, ACC / ASR on the report images):", ""]
    for r in results:
        steps = "; ".join(f"{p['step']}: {p['neuron'] or '—'} {100 * p['acc']:.2f} / {100 * p['asr']:.2f}"
                          for p in r["path"])
        lines.append(f"- {r['dataset']} {r['attack']}: {steps}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "fashion_mnist"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--steps", type=int, default=8, help="neurons pruned at most")
    parser.add_argument("--choose", type=int, default=500, help="clean and triggered test images the choice reads")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/frontier"))
    parser.add_argument("--compare", type=Path, help="a bench.compare JSON: put its ONP rows beside the oracle")
    parser.add_argument("--merge", nargs="*", type=Path, default=[], help="earlier frontier JSONs to add to the table")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    partial, results = args.out / "frontier.partial.json", []
    for subject in load_zoo(args.profile, args.datasets, args.attacks, cached_only=True):
        results.append(frontier(subject, args.steps, args.choose))
        partial.write_text(json.dumps(results, indent=2))  # minutes per subject: a stopped run keeps what it found
    fresh = {r["subject"] for r in results}
    for path in args.merge:
        results += [r for r in json.loads(path.read_text()) if r["subject"] not in fresh]
    compare = json.loads(args.compare.read_text()) if args.compare else None
    header = (f"## Oracle pruning frontier (reference only) — {args.profile} profile — {date.today()} — "
              f"{platform.machine()}, torch {torch.__version__}\n\nCommand: `python -m bench.frontier --profile "
              f"{args.profile} --datasets {' '.join(args.datasets)} --attacks {' '.join(args.attacks)} --steps "
              f"{args.steps} --choose {args.choose}`. Chosen on {args.choose} clean and {args.choose} triggered test "
              "images, reported on the rest of the test set.")
    partial.unlink(missing_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(results, indent=2))
    (args.out / "frontier.md").write_text(markdown(results, header, compare))
    print(markdown(results, header, compare))


if __name__ == "__main__":
    main()
