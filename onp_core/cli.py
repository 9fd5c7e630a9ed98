"""The ``onp`` command: train subjects, repair models, run and talk to the service."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(help="onp-repair: find and prune the neurons that carry a backdoor in an image classifier.",
                  no_args_is_help=True, add_completion=False)
console = Console()


@app.callback()
def _root() -> None:
    """onp-repair: find and prune the neurons that carry a backdoor in an image classifier."""


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)


@app.command()
def train(
    arch: str = typer.Option("small_cnn", help="registry architecture"),
    dataset: str = typer.Option("cifar10", help="cifar10 or fashion_mnist"),
    attack: str = typer.Option("badnets", help="badnets, blended, wanet, sig, or 'none' for a clean model"),
    poison_rate: float = typer.Option(0.1, min=0.0, max=1.0),
    target: int = typer.Option(0, help="target class of the all-to-one backdoor"),
    epochs: int = typer.Option(10, min=1),
    lr: float = typer.Option(0.1),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder for model, manifest and subject.json"),
) -> None:
    """Train a clean or backdoored test subject on a built-in data set."""
    from .subjects import SubjectSpec, train_subject

    spec = SubjectSpec(arch=arch, dataset=dataset, attack=None if attack == "none" else attack, target=target,
                       poison_rate=poison_rate, epochs=epochs, seed=seed, lr=lr)
    with _progress() as bar:
        task = bar.add_task("training", total=epochs, info="")

        def on_epoch(done: int, total: int, info: dict[str, float]) -> None:
            line = f"loss {info['loss']:.3f} train-acc {info['train_acc']:.3f} {info['seconds']:.0f}s/epoch"
            bar.update(task, completed=done, info=line)
            if not console.is_terminal:
                console.print(f"epoch {done}/{total}: {line}")

        subject = train_subject(spec, out, on_epoch=on_epoch, device=device)
    table = Table(title=f"subject {spec.key()}")
    for col in ("ACC", "ASR", "RA", "seconds"):
        table.add_column(col)
    m = subject.metrics
    fmt = lambda v: "—" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    table.add_row(fmt(m["acc"]), fmt(m["asr"]), fmt(m["ra"]), str(m["train_seconds"]))
    console.print(table)
    console.print(f"wrote {out}/model.safetensors, manifest.json, subject.json")


@app.command("make-clean-set")
def make_clean_set(
    dataset: str = typer.Option("cifar10", help="cifar10 or fashion_mnist"),
    n: int = typer.Option(500, min=10, help="number of images, class-balanced"),
    split_name: str = typer.Option("train", "--split", help="train or test"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "-o", "--out", help="output .npz (x uint8 NCHW, y int64)"),
) -> None:
    """Write a class-balanced clean subset of a built-in data set as .npz (the defender's data)."""
    import numpy as np

    from .data import balanced_subset, load_dataset

    subset = balanced_subset(load_dataset(dataset, split_name), n, seed=seed)
    np.savez_compressed(out, x=subset.images.numpy(), y=subset.labels.numpy())
    console.print(f"wrote {len(subset)} images {subset.shape} to {out}")


def _load_eval_sets(eval_attack: str | None, target: int, test_data: str | None, triggered: Path | None,
                    manifest_shape: tuple[int, int, int]) -> tuple[object, object, int | None]:
    """Clean test set and triggered test set used ONLY to report ACC/ASR after the repair."""
    import json

    from .attacks import attack_from_spec, make_attack
    from .data import load_dataset
    from .data.uploads import read_clean_data

    if test_data is None:
        return None, None, None
    test = load_dataset(test_data, "test") if test_data in ("cifar10", "fashion_mnist") else read_clean_data(Path(test_data))
    trig = None
    if triggered is not None:
        trig = read_clean_data(triggered)
    elif eval_attack:
        p = Path(eval_attack)
        if p.exists():
            spec = json.loads(p.read_text())
            attack = attack_from_spec(spec["attack"] if "attack" in spec and isinstance(spec["attack"], dict) else spec)
        else:
            attack = make_attack(eval_attack, target=target)
        target = attack.target
        trig = attack.triggered_test_set(test)
    return test, trig, (target if trig is not None else None)


@app.command()
def repair(
    model_path: Path = typer.Argument(..., help="model file (.safetensors, .pt, .pt2) or a folder with manifest.json"),
    data: Path = typer.Option(..., "--data", help="clean data: .npz, or a .zip/.tar of class folders"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder for the repaired model and report.json"),
    method: str = typer.Option("onp", help="onp, anp, rnp, clp or fp"),
    manifest: Optional[Path] = typer.Option(None, help="manifest.json when the model file has none"),
    options: str = typer.Option("{}", help="method options as JSON, e.g. '{\"iterations\": 20}'"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    test_data: Optional[str] = typer.Option(None, help="test set for reporting: cifar10, fashion_mnist or a file"),
    eval_attack: Optional[str] = typer.Option(None, help="attack name or subject.json, to report ASR (never used by the defense)"),
    triggered: Optional[Path] = typer.Option(None, help="a triggered test set (.npz), to report ASR"),
    target: int = typer.Option(0, help="target class for ASR with --eval-attack NAME or --triggered"),
) -> None:
    """Repair a backdoored model with clean data only; print a before/after table."""
    import json
    import time

    from .data.uploads import read_clean_data
    from .defenses import make_config, get_defense
    from .metrics import class_recall, der, erased_class_warnings, evaluate
    from .models import ModelManifest, load_model, save_model
    from .neurons import NoPrunableNeurons, discover_neurons

    loaded = load_model(model_path, ModelManifest.load(manifest) if manifest else None)
    try:  # refuse before reading any data a model these defenses cannot act on
        discover_neurons(loaded.model, loaded.manifest.input_shape)
    except NoPrunableNeurons as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    clean = read_clean_data(data, num_classes=loaded.manifest.num_classes, expected_shape=loaded.manifest.input_shape)
    opts = {"seed": seed, "device": device, **json.loads(options)}
    config = make_config(method, opts)
    test, trig, tgt = _load_eval_sets(eval_attack, target, test_data, triggered, loaded.manifest.input_shape)
    classes = loaded.manifest.num_classes
    before = evaluate(loaded.model, test, trig, tgt, num_classes=classes) if test is not None else None
    t0 = time.time()
    with _progress() as bar:
        task = bar.add_task(f"{method} repair", total=None, info="")

        def on_progress(step: int, total: int, info: dict) -> None:
            shown = " ".join(f"{k}={v}" for k, v in info.items())
            bar.update(task, completed=step, total=total or None, info=shown[:80])

        result = get_defense(method).repair(loaded.model, clean, config, on_progress)
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    suffix = {"safetensors": ".safetensors", "pt": ".pt", "pt2": ".pt2"}[loaded.format]
    save_model(result.model, out / f"model{suffix}", loaded.format)
    after = evaluate(result.model, test, trig, tgt, num_classes=classes) if test is not None else None
    table = Table(title=f"{method} repair ({result.num_pruned} neurons pruned, {seconds:.1f}s)")
    for col in ("", "clean held-out ACC", "test ACC", "ASR", "RA"):
        table.add_column(col)
    fmt = lambda v: "—" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    table.add_row("before", fmt(result.clean_acc_before), fmt(before.acc if before else None),
                  fmt(before.asr if before else None), fmt(before.ra if before else None))
    table.add_row("after", fmt(result.clean_acc_after), fmt(after.acc if after else None),
                  fmt(after.asr if after else None), fmt(after.ra if after else None))
    console.print(table)
    if before is not None and after is not None:  # per class on unseen images when given (same pass as ACC)
        recall = {"before": before.class_recall, "after": after.class_recall}
    else:  # else on the clean data itself
        recall = {"before": class_recall(loaded.model, clean, classes),
                  "after": class_recall(result.model, clean, classes)}
    warnings = erased_class_warnings(recall["before"], recall["after"])
    for line in warnings:
        console.print(f"[yellow]warning:[/yellow] {line}")
    report = {"method": method, "options": config.model_dump(mode="json"), "seconds": seconds,
              "num_pruned": result.num_pruned, "pruned": result.pruned,
              "clean_acc_before": result.clean_acc_before, "clean_acc_after": result.clean_acc_after,
              "test_before": before.as_dict() if before else None, "test_after": after.as_dict() if after else None,
              "der": der(before, after) if before and after else None,
              "class_recall": recall, "warnings": warnings, "trace": result.trace,
              "details": result.details}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    console.print(f"wrote {out / ('model' + suffix)} and {out / 'report.json'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
