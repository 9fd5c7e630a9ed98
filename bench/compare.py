"""ONP against ANP, RNP, CLP and Fine-Pruning, side by side on the same subjects and clean data.

    .venv/bin/python -m bench.compare --profile cpu [--seeds 0 1 2] [--methods onp anp rnp clp fp]

For every backdoored subject and seed, every method gets the same 500 class-balanced
clean training images (1%) and the same seed. ACC/ASR/RA are measured on the full
test split and its triggered version (used only for reporting). Writes
docs/benchmarks/<profile>.json, .md and .png; the ANP oracle-threshold row (chosen by
ASR, i.e. with knowledge of the attack) is a clearly labelled reference, not a method.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from onp_core.data import balanced_subset, load_dataset
from onp_core.defenses import METHODS, run_repair
from onp_core.metrics import Metrics, der, evaluate
from onp_core.models import ImageClassifier, load_model, save_model

from .zoo import ATTACKS, PROFILES, load_zoo, pct


def as_exported_program(model: ImageClassifier) -> ImageClassifier:
    """The model as a user with an unregistered architecture uploads it: a ``torch.export`` .pt2."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, Path(tmp) / "model.pt2", "pt2")
        return load_model(path).model


def run_one(subject: Any, method: str, seed: int, n_clean: int, options: dict[str, Any],
            as_pt2: bool = False) -> dict[str, Any]:
    test, triggered = subject.test_sets()
    target = subject.attack.target if subject.attack else None  # a clean subject has no ASR, RA or DER
    clean = balanced_subset(load_dataset(subject.spec.dataset, "train"), n_clean, seed=100 + seed)
    before = evaluate(subject.model, test, triggered, target)
    upload = as_exported_program(subject.model) if as_pt2 else subject.model
    t = time.perf_counter()
    result = run_repair(upload, clean, method, {"seed": seed, **options.get(method, {})})
    seconds = time.perf_counter() - t
    after = evaluate(result.model, test, triggered, target)
    row = {"subject": subject.spec.key(), "dataset": subject.spec.dataset, "attack": subject.spec.attack_label(),
           "arch": subject.spec.arch + (" (.pt2)" if as_pt2 else ""), "method": method, "seed": seed,
           "acc_before": before.acc, "asr_before": before.asr,
           "acc": after.acc, "asr": after.asr, "ra": after.ra, "der": der(before, after),
           "pruned": result.num_pruned, "seconds": seconds,
           "neurons": result.pruned}  # which ones, by layer name: bench.replacement re-applies them without a re-run
    # where the time went and what was flagged (ONP), so a slow or missed repair can be explained from the JSON
    row.update({k: result.details[k] for k in ("timing", "suspects", "verdict", "dormant")
                if result.details.get(k) is not None})
    if result.details.get("triggers"):  # ONP's first synthesis: every family's per-class costs and indices
        row["triggers"] = {k: result.details["triggers"][k] for k in ("anomaly", "weights", "by_family")}
    follow_ups = [f for r in result.details.get("rounds", []) for f in r.get("reattacks", [])]
    if follow_ups:  # ONP's re-attack rounds: the suspects' evidence against natural rivals, what each pruned
        row["reattacks"] = [{k: f[k] for k in ("evidence", "verdict", "pruned") if k in f} for f in follow_ups]
    if method == "anp" and target is not None:
        from onp_core.defenses.anp import oracle_sweep

        best = oracle_sweep(subject.model, result, test, triggered, target)["best"]
        ref = Metrics(best["acc"], best["asr"], best.get("ra"))
        row["anp_oracle"] = {"acc": ref.acc, "asr": ref.asr, "der": der(before, ref), "threshold": best.get("threshold")}
    return row


def merge_results(rows: list[dict[str, Any]], paths: list[Path], kind: str) -> list[dict[str, Any]]:
    """``rows`` plus the rows of earlier result JSONs that this run did not redo.

    A row is identified by its subject, seed and ``kind`` ("method", or an ablation's "variant"), so
    subjects run as separate jobs (or re-run after a fix) end up in one table without duplicates. Among
    the earlier files the first one listed wins, so list the newest first.
    """
    seen = {(r["subject"], r[kind], r["seed"]) for r in rows}
    for path in paths:
        new = [r for r in json.loads(path.read_text()) if (r["subject"], r[kind], r["seed"]) not in seen]
        rows = rows + new
        seen |= {(r["subject"], r[kind], r["seed"]) for r in new}
    return rows


def merged_note(paths: list[Path]) -> str:
    """The header's note of which earlier result files a table was merged with (empty for none)."""
    return f" (merged with {' '.join(str(p) for p in paths)})" if paths else ""


def _mean_std(values: list[float | None]) -> str:
    """Mean ± std in percent of the known values ("—" for none: a clean subject's ASR, RA and DER)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def _mean(values: Any) -> str:
    """A plain mean in percent of the known values, "—" for none (a clean subject's ASR)."""
    known = [v for v in values if v is not None]
    return pct(statistics.mean(known) if known else None)


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| dataset | attack | arch | method | ACC | ASR | RA | DER | pruned | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["dataset"], r["attack"], r.get("arch", "")) for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for ds, atk, arch in keys:
        sub = [r for r in rows if (r["dataset"], r["attack"], r.get("arch", "")) == (ds, atk, arch)]
        lines.append(f"| {ds} | {atk} | {arch} | no defense | {100 * statistics.mean(r['acc_before'] for r in sub):.2f} | "
                     f"{_mean(r['asr_before'] for r in sub)} | — | — | 0 | — |")
        for m in methods:
            rs = [r for r in sub if r["method"] == m]
            if not rs:
                continue
            lines.append(f"| {ds} | {atk} | {arch} | {m} | {_mean_std([r['acc'] for r in rs])} | {_mean_std([r['asr'] for r in rs])} "
                         f"| {_mean_std([r['ra'] for r in rs])} | {_mean_std([r['der'] for r in rs])} "
                         f"| {statistics.mean(r['pruned'] for r in rs):.1f} | {statistics.mean(r['seconds'] for r in rs):.1f} |")
            oracle = [r["anp_oracle"] for r in rs if "anp_oracle" in r]
            if oracle:
                lines.append(f"| {ds} | {atk} | {arch} | *anp oracle (threshold picked by ASR — reference only)* | "
                             f"{_mean_std([o['acc'] for o in oracle])} | {_mean_std([o['asr'] for o in oracle])} | — | "
                             f"{_mean_std([o['der'] for o in oracle])} | — | — |")
    lines += ["", "**Averages per method** (over subjects and seeds; ± is the std over all runs)", "",
              "| method | ΔACC (points) | ASR after | DER | seconds |", "|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        lines.append(f"| {m} | {_mean_std([r['acc'] - r['acc_before'] for r in rs])} | {_mean_std([r['asr'] for r in rs])} "
                     f"| {_mean_std([r['der'] for r in rs])} | {statistics.mean(r['seconds'] for r in rs):.1f} |")
        oracle = [(r["acc_before"], r["anp_oracle"]) for r in rs if "anp_oracle" in r]
        if oracle:
            lines.append(f"| *{m} oracle (threshold picked by ASR — reference only)* | "
                         f"{_mean_std([o['acc'] - before for before, o in oracle])} | "
                         f"{_mean_std([o['asr'] for _, o in oracle])} | {_mean_std([o['der'] for _, o in oracle])} | — |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["dataset"], r["attack"], r.get("arch", "")) for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(keys)), 3.5))
    width = 0.8 / max(1, len(methods))
    # DER where the subjects have an attack; on clean subjects (no ASR) what a defense costs: ΔACC in points
    has_der = any(r["der"] is not None for r in rows)

    def value(r: dict[str, Any]) -> float:
        return r["der"] if has_der else 100 * (r["acc"] - r["acc_before"])
    for i, m in enumerate(methods):
        vals = [statistics.mean([value(r) for r in rows if r["method"] == m
                                 and (r["dataset"], r["attack"], r.get("arch", "")) == k
                                 and (not has_der or r["der"] is not None)] or [0]) for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=m)
    several = len({k[2] for k in keys}) > 1  # name the architecture only where a table mixes them
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))],
                  [f"{d}\n{a}" + (f"\n{arch}" if several else "") for d, a, arch in keys], fontsize=8)
    ax.set_ylabel("DER" if has_der else "ΔACC (points)")
    if has_der:
        ax.set_ylim(0, 1)
    ax.legend(ncol=len(methods), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=(*METHODS, "none"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "fashion_mnist"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--n-clean", type=int, default=500)
    parser.add_argument("--options", default="{}", help='per-method options JSON, e.g. {"onp": {"iterations": 20}}')
    parser.add_argument("--as-pt2", action="store_true", help="repair each subject as an exported .pt2 program "
                        "(the path of an architecture the registry does not know)")
    parser.add_argument("--cached-only", action="store_true", help="skip subjects not yet trained in the cache")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--merge", nargs="*", type=Path, default=[],
                        help="earlier result JSONs to include in the table (a run of the same subject, method and "
                             "seed here replaces theirs); with --methods none, only merge")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    options = json.loads(args.options)
    methods = [m for m in args.methods if m != "none"]
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"{args.profile}.partial.json"
    for subject in load_zoo(args.profile, args.datasets, args.attacks, cached_only=args.cached_only) if methods else []:
        for seed in args.seeds:
            for method in methods:
                row = run_one(subject, method, seed, args.n_clean, options, args.as_pt2)
                rows.append(row)
                # every finished row on disk at once: a profile with ANP runs for hours, and a stopped run keeps its
                # rows for ``--merge``
                partial.write_text(json.dumps(rows, indent=2))
                print(f"{row['subject']} seed {seed} {method}: ACC {pct(row['acc'])} ASR {pct(row['asr'])} "
                      f"DER {pct(row['der'])} pruned {row['pruned']} {row['seconds']:.1f}s", flush=True)
    rows = merge_results(rows, args.merge, "method")
    partial.unlink(missing_ok=True)
    merged = merged_note(args.merge)
    # a merge-only run (``--methods none``) ran nothing: its seeds, datasets and attacks say nothing about the rows
    command = (f"--seeds {' '.join(map(str, args.seeds))} --methods {' '.join(args.methods)} "
               f"--datasets {' '.join(args.datasets)} --attacks {' '.join(args.attacks)}"
               f"{' --cached-only' if args.cached_only else ''}{' --as-pt2' if args.as_pt2 else ''} "
               f"--options '{args.options}'" if methods else "--methods none")
    header = (f"## {args.profile} profile — {date.today()} — {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}\n\n"
              f"Command: `python -m bench.compare --profile {args.profile} {command}`{merged}")
    (args.out / f"{args.profile}.json").write_text(json.dumps(rows, indent=2))
    (args.out / f"{args.profile}.md").write_text(markdown(rows, header))
    plot(rows, args.out / f"{args.profile}.png")
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
