"""Backdoored test subjects: train, save, reload, and cache them.

A subject folder holds ``model.safetensors`` + ``manifest.json`` (the model as a user
would upload it) and ``subject.json`` (attack spec, poison rate, data set, metrics).
The attack spec is there to *report* ASR; defenses never read it.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .attacks import Attack, attack_from_spec, make_attack
from .data import ImageSet, load_dataset
from .data.cache import cache_dir
from .metrics import evaluate
from .models import ImageClassifier, ModelManifest, build_model, load_model, save_model
from .train import TrainConfig, train_model

SUBJECT_FORMAT = 2  # bump when training changes, so cached subjects are retrained
DATASET_SHAPES = {"cifar10": (3, 32, 32), "fashion_mnist": (1, 28, 28)}


@dataclass
class SubjectSpec:
    arch: str = "small_cnn"
    dataset: str = "cifar10"
    attack: str | None = "badnets"
    target: int = 0
    poison_rate: float = 0.1
    epochs: int = 10
    seed: int = 0
    lr: float = 0.1
    batch_size: int = 128
    # the attack's own parameters (BadNets pattern/position/size, Blended key/alpha, ...); empty = its defaults
    attack_options: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        atk = self.attack or "clean"
        key = (f"v{SUBJECT_FORMAT}-{self.arch}-{self.dataset}-{atk}-t{self.target}-p{self.poison_rate:g}"
               f"-e{self.epochs}-s{self.seed}")
        return key + (f"-{self.options_tag()}" if self.attack_options else "")

    def options_tag(self) -> str:
        """The attack options as a short, file-name-safe tag (``pattern=checker,size=4``)."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.attack_options.items()))

    def attack_label(self) -> str:
        """The attack as benchmark tables name it: its name, with its options when they are not the defaults."""
        atk = self.attack or "none"
        return f"{atk}[{self.options_tag()}]" if self.attack_options else atk


@dataclass
class Subject:
    path: Path
    model: ImageClassifier
    spec: SubjectSpec
    attack: Attack | None
    metrics: dict[str, Any]

    def test_sets(self) -> tuple[ImageSet, ImageSet | None]:
        """The clean test split and (for backdoored subjects) its triggered version."""
        test = load_dataset(self.spec.dataset, "test")
        return test, (self.attack.triggered_test_set(test) if self.attack else None)


def train_subject(spec: SubjectSpec, out: Path, on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
                  device: str = "auto") -> Subject:
    t0 = time.time()
    train = load_dataset(spec.dataset, "train")
    attack = (make_attack(spec.attack, target=spec.target, seed=spec.seed, **spec.attack_options)
              if spec.attack else None)
    if attack is not None:
        train = attack.poison_training_set(train, spec.poison_rate, defer_trigger=True)
        if hasattr(attack, "noise_fraction"):
            attack.noise_fraction = spec.poison_rate * getattr(attack, "cross_ratio", 0.0)
    c, h, w = DATASET_SHAPES[spec.dataset]
    manifest = ModelManifest(arch=spec.arch, num_classes=10, input_shape=(c, h, w), class_names=train.class_names)
    # the spec's seed must fix the initial weights too: torch seeds its default generator
    # from the OS in every process, so without this each training drew a different subject
    # (CI's CIFAR-10 BadNets subject changed run to run and ONP's ASR after with it, 2.6–14.3%)
    torch.manual_seed(spec.seed)
    model = build_model(manifest)
    config = TrainConfig(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed,
                         hflip=spec.dataset != "fashion_mnist", crop_padding=4 if h >= 32 else 2, device=device)
    train_model(model, train, config, attack=attack, on_epoch=on_epoch)
    test = load_dataset(spec.dataset, "test")
    triggered = attack.triggered_test_set(test) if attack else None
    m = evaluate(model, test, triggered, spec.target if attack else None)
    metrics = {**m.as_dict(), "train_seconds": round(time.time() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "model.safetensors")
    (out / "subject.json").write_text(json.dumps({"spec": asdict(spec), "attack": attack.spec() if attack else None,
                                                  "metrics": metrics}, indent=2))
    return Subject(out, model, spec, attack, metrics)


def load_subject(path: Path) -> Subject:
    info = json.loads((path / "subject.json").read_text())
    loaded = load_model(path)
    attack = attack_from_spec(info["attack"]) if info.get("attack") else None
    return Subject(path, loaded.model, SubjectSpec(**info["spec"]), attack, info["metrics"])


def is_cached(spec: SubjectSpec) -> bool:
    """Whether the subject is already trained in the cache (benchmarks can skip the rest)."""
    return (cache_dir() / "subjects" / spec.key() / "subject.json").exists()


def cached_subject(spec: SubjectSpec, **kwargs: Any) -> Subject:
    """Load the subject from the cache, training it first if absent (tests and benchmarks).

    An exclusive file lock per subject: a second process asking for the same subject (two
    benchmark jobs, a test run beside a benchmark) waits and loads the first one's result
    instead of training it again into the same ``.partial`` folder.
    """
    import fcntl
    import shutil

    path = cache_dir() / "subjects" / spec.key()
    if (path / "subject.json").exists():
        return load_subject(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "subject.json").exists():
            return load_subject(path)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        train_subject(spec, tmp, **kwargs)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    return load_subject(path)
