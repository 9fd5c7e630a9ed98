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
            bar.update(task, completed=done,
                       info=f"loss {info['loss']:.3f} train-acc {info['train_acc']:.3f} {info['seconds']:.0f}s/epoch")

        subject = train_subject(spec, out, on_epoch=on_epoch, device=device)
    table = Table(title=f"subject {spec.key()}")
    for col in ("ACC", "ASR", "RA", "seconds"):
        table.add_column(col)
    m = subject.metrics
    fmt = lambda v: "—" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    table.add_row(fmt(m["acc"]), fmt(m["asr"]), fmt(m["ra"]), str(m["train_seconds"]))
    console.print(table)
    console.print(f"wrote {out}/model.safetensors, manifest.json, subject.json")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
