"""Train (or reuse from the cache) the CPU subject zoo and print ACC/ASR with times.

    .venv/bin/python -m bench.zoo --profile cpu [--datasets cifar10 fashion_mnist] [--attacks badnets ...]

The cpu profile is small CNN × {BadNets, Blended, WaNet, SIG} × {CIFAR-10, Fashion-MNIST},
10% poisoning, target 0. The heldout profile is the same network trained with what ONP's
defaults were never set on: another target class per attack (3, 6, 9, 2), 5% poisoning and
another seed. The triggers profile is the same network with trigger shapes the defaults never saw: a
4×4 checkerboard in the top-left corner, a 5×5 seeded random patch in the bottom-left, and a smooth
low-frequency blend key at opacity 0.1, each with its own target, rate and seed. The residual profile
is the held-out check on another architecture too: a PreAct-ResNet18 of width 16 (residual adds, BN
before conv) on CIFAR-10, target 7, 5% poisoning; ``bench.compare --as-pt2`` repairs it as an exported program, as a user with an
unknown architecture would upload it. The fc profile is the classic backdoor-paper network (two
conv layers without BN, a hidden fully-connected layer: ``cnn_fc``), target 5, 10% poisoning,
another seed: neurons without BN and hidden linear units. The clean profile is the false-positive check:
each of those architectures trained exactly as its backdoored subjects, without poisoning, so
``bench.compare --profile clean`` shows what a defense costs a model that has no backdoor
(ONP's dormant sweep runs at its larger budget exactly there, docs/ONP.md §1u). The gpu profile
trains PreAct-ResNet18 and VGG16-BN on CIFAR-10 (BackdoorBench protocol) and is meant for a machine with a GPU.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onp_core.subjects import Subject, SubjectSpec, cached_subject, is_cached

EPOCHS = {"cifar10": 8, "fashion_mnist": 4}
ATTACKS = ("badnets", "blended", "wanet", "sig")
PROFILES = ("cpu", "heldout", "triggers", "residual", "fc", "clean", "gpu")
# the held-out profile's per-attack target class and poison rate: none of them is the cpu profile's (target 0, 10%)
HELDOUT = {"badnets": (3, 0.05), "blended": (6, 0.05), "wanet": (9, 0.05), "sig": (2, 0.05)}
# the triggers profile: trigger shapes ONP's defaults were never set on (target, poison rate, attack options) per attack
TRIGGER_VARIANTS = {
    "badnets": [(1, 0.05, {"pattern": "checker", "size": 4, "position": "top-left"}),
                (8, 0.1, {"pattern": "random", "size": 5, "position": "bottom-left"})],
    "blended": [(5, 0.1, {"key": "smooth", "alpha": 0.1})],
}


def zoo_specs(profile: str, datasets: list[str], attacks: list[str], seed: int = 0) -> list[SubjectSpec]:
    """The subjects of a profile (the clean profile ignores ``attacks``: its models have none)."""
    if profile == "clean":
        return [spec for d in datasets for spec in _clean_twins(d, seed)]
    if profile == "cpu":
        return [SubjectSpec(arch="small_cnn", dataset=d, attack=a, epochs=EPOCHS[d], seed=seed)
                for d in datasets for a in attacks]
    if profile == "heldout":
        return [SubjectSpec(arch="small_cnn", dataset=d, attack=a, target=HELDOUT[a][0], poison_rate=HELDOUT[a][1],
                            epochs=EPOCHS[d], seed=seed + 7) for d in datasets for a in attacks]
    if profile == "triggers":
        return [SubjectSpec(arch="small_cnn", dataset=d, attack=a, target=t, poison_rate=rate, epochs=EPOCHS[d],
                            seed=seed + 21, attack_options=opts)
                for d in datasets for a in attacks for t, rate, opts in TRIGGER_VARIANTS.get(a, [])]
    if profile == "fc":
        return [SubjectSpec(arch="cnn_fc", dataset=d, attack=a, target=5, poison_rate=0.1, epochs=EPOCHS[d],
                            seed=seed + 3) for d in datasets for a in attacks]
    if profile == "residual":
        return [SubjectSpec(arch="preact_resnet18_w16", dataset="cifar10", attack=a, target=7, poison_rate=0.05,
                            epochs=6, seed=seed) for a in attacks if "cifar10" in datasets]
    return [SubjectSpec(arch=arch, dataset="cifar10", attack=a, epochs=60, seed=seed, lr=0.1)
            for arch in ("preact_resnet18", "vgg16_bn") for a in attacks]


def _clean_twins(dataset: str, seed: int) -> list[SubjectSpec]:
    """Each architecture of the cpu, fc and residual profiles on ``dataset``, trained as there but never poisoned.

    Derived from those profiles' own specs, so a change to their training carries over; the attack's
    target and rate are reset to the spec defaults, which a clean subject does not use.
    """
    plain = SubjectSpec()
    return [replace(spec, attack=None, attack_options={}, target=plain.target, poison_rate=plain.poison_rate)
            for profile in ("cpu", "fc", "residual") for spec in zoo_specs(profile, [dataset], ATTACKS[:1], seed)]


def load_zoo(profile: str, datasets: list[str], attacks: list[str], seed: int = 0,
             cached_only: bool = False) -> list[Subject]:
    """The zoo's subjects, training missing ones (or skipping them with ``cached_only``)."""
    specs = zoo_specs(profile, datasets, attacks, seed)
    if cached_only:
        specs = [s for s in specs if is_cached(s)]
    return [cached_subject(spec) for spec in specs]


def pct(value: float | None) -> str:
    """A rate in percent; "—" for an unknown one (a clean subject has no ASR, RA or DER)."""
    return "—" if value is None else f"{100 * value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "fashion_mnist"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--out", type=Path, default=Path("docs/zoo.json"))
    args = parser.parse_args()
    console = Console()
    rows = []
    for spec in zoo_specs(args.profile, args.datasets, args.attacks):
        t = time.time()
        subject = cached_subject(spec)
        rows.append({"spec": asdict(spec), **subject.metrics, "load_seconds": round(time.time() - t, 1)})
        console.print(f"{spec.key()}: ACC {pct(subject.metrics['acc'])} ASR {pct(subject.metrics['asr'])} "
                      f"({subject.metrics['train_seconds']}s to train)")
    table = Table(title=f"subject zoo ({args.profile})")
    for col in ("arch", "dataset", "attack", "epochs", "ACC", "ASR", "RA", "train s"):
        table.add_column(col)
    for r in rows:
        s = r["spec"]
        table.add_row(s["arch"], s["dataset"], escape(SubjectSpec(**s).attack_label()), str(s["epochs"]),
                      pct(r["acc"]), pct(r["asr"]), pct(r["ra"]), str(r["train_seconds"]))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merge_rows(args.out, rows), indent=2))


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """``rows`` replacing the rows of the same subjects in ``path``'s table, the others kept.

    A run over a few subjects (one dataset, one attack) must not erase the rest of the
    zoo's table; a retrained subject's row replaces its earlier one.
    """
    if not path.exists():
        return rows
    def key(row: dict) -> str:
        return SubjectSpec(**row["spec"]).key()
    fresh = {key(r) for r in rows}
    return [r for r in json.loads(path.read_text()) if key(r) not in fresh] + rows


if __name__ == "__main__":
    main()
