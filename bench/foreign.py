"""Backdoored networks of architectures the registry does not know, repaired as `.pt2` uploads.

    .venv/bin/python -m bench.foreign [--archs se dense groupnorm pad mobile vit] [--methods onp clp fp]

Each network (``bench.foreign_models``) is trained on Fashion-MNIST with BadNets aimed at class 4,
10% poisoning, seed 11 — a target, seed and architecture the ONP defaults were never set on —
exported with ``torch.export`` and cached as ``model.pt2`` (``$ONP_CACHE_DIR/foreign/``). Every
method then repairs the loaded program, as the service would, with the 500 clean images of seed 100.
Writes ``<out>/foreign.{md,json,png}`` in ``bench.compare``'s format (the architecture in the
dataset column).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from onp_core.attacks import make_attack
from onp_core.data import balanced_subset, load_dataset
from onp_core.data.cache import cache_dir
from onp_core.defenses import METHODS, run_repair
from onp_core.metrics import der, evaluate
from onp_core.models import ImageClassifier, ModelManifest, load_model, save_model
from onp_core.train import TrainConfig, train_model

from . import foreign_models as fm
from .compare import markdown, plot

DATASET, ATTACK, TARGET, POISON_RATE, SEED, EPOCHS = "fashion_mnist", "badnets", 4, 0.1, 11, 4
# (builder for 1×28×28 inputs, SGD learning rate): the transformer needs a smaller rate to train
ARCHS: dict[str, tuple[Callable[[], nn.Module], float]] = {
    "se": (lambda: fm.SqueezeExcite(1, 32), 0.05),
    "dense": (lambda: fm.DenseBlocks(1, 32), 0.05),
    "groupnorm": (lambda: fm.GroupNormNet(1, 32), 0.05),
    "pad": (lambda: fm.PadShortcut(1, 32), 0.05),
    "mobile": (lambda: fm.MobileBlock(1, 16), 0.05),
    "vit": (lambda: fm.TinyViT(1, image=28, patch=4, dim=64, depth=2), 0.01),
}


def trained_program(arch: str) -> ImageClassifier:
    """The backdoored network as an exported program, trained once and cached (``train.json``: its training time)."""
    folder = cache_dir() / "foreign" / f"{arch}-{DATASET}-{ATTACK}-t{TARGET}-p{POISON_RATE:g}-e{EPOCHS}-s{SEED}"
    path = folder / "model.pt2"
    if not path.exists():
        build, lr = ARCHS[arch]
        attack = make_attack(ATTACK, target=TARGET, seed=SEED)
        train = attack.poison_training_set(load_dataset(DATASET, "train"), POISON_RATE, defer_trigger=True)
        torch.manual_seed(SEED)
        net = build()
        t = time.perf_counter()
        train_model(net, train, TrainConfig(epochs=EPOCHS, lr=lr, seed=SEED, hflip=False, crop_padding=2),
                    attack=attack)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(ImageClassifier(net.eval(), ModelManifest(arch="exported", num_classes=10, input_shape=(1, 28, 28))),
                   path, "pt2")
        (folder / "train.json").write_text(json.dumps({"seconds": round(time.perf_counter() - t, 1)}))
    return load_model(path).model


def run(arch: str, methods: list[str], seeds: list[int], options: dict[str, Any] | None = None
        ) -> list[dict[str, Any]]:
    """Repair the cached program of ``arch`` with every method and seed; ``options`` per method, as in bench.compare."""
    options = options or {}
    model = trained_program(arch)
    attack = make_attack(ATTACK, target=TARGET, seed=SEED)
    test = load_dataset(DATASET, "test")
    triggered = attack.triggered_test_set(test)
    before = evaluate(model, test, triggered, TARGET)
    rows = []
    for seed in seeds:
        clean = balanced_subset(load_dataset(DATASET, "train"), 500, seed=100 + seed)
        for method in methods:
            t = time.perf_counter()
            result = run_repair(model, clean, method, {"seed": seed, **options.get(method, {})})
            seconds = time.perf_counter() - t
            after = evaluate(result.model, test, triggered, TARGET)
            row = {"subject": f"foreign-{arch}", "dataset": f"{DATASET} ({arch}, .pt2)", "attack": ATTACK,
                   "arch": arch, "method": method, "seed": seed, "acc_before": before.acc, "asr_before": before.asr,
                   "acc": after.acc, "asr": after.asr, "ra": after.ra, "der": der(before, after),
                   "pruned": result.num_pruned, "seconds": seconds,
                   "layers": {k: len(v) for k, v in result.pruned.items()}, "options": options.get(method, {})}
            row.update({k: result.details[k] for k in ("suspects", "verdict", "finetune_undone")
                        if result.details.get(k) is not None})
            rows.append(row)
            print(f"{arch} seed {seed} {method}: ACC {before.acc:.4f}→{after.acc:.4f} "
                  f"ASR {before.asr:.4f}→{after.asr:.4f} DER {row['der']:.4f} pruned {row['pruned']} {seconds:.1f}s",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--methods", nargs="+", default=["onp", "clp", "fp"], choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--options", default="{}", help='per-method options JSON, e.g. {"onp": {"joint_mask": "both"}}')
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/foreign"))
    args = parser.parse_args()
    options = json.loads(args.options)
    rows = [row for arch in args.archs for row in run(arch, args.methods, args.seeds, options)]
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"## foreign architectures as .pt2 — {date.today()} — {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}\n\n"
              f"Command: `python -m bench.foreign --archs {' '.join(args.archs)} --methods {' '.join(args.methods)} "
              f"--seeds {' '.join(map(str, args.seeds))} --options '{args.options}'`")
    (args.out / "foreign.json").write_text(json.dumps(rows, indent=2))
    (args.out / "foreign.md").write_text(markdown(rows, header))
    plot(rows, args.out / "foreign.png")
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
