"""Shared fixtures: real backdoored subjects trained once per test run and cached.

Training happens in ``$ONP_CACHE_DIR`` (``scripts/test.sh`` sets it), so every test
that needs a subject reuses the same one. The epochs are the smallest that reach
the accuracy the engine issue demands (measured: see docs/BENCHMARKS.md).
"""
from __future__ import annotations

import os

import pytest
import torch

from onp_core.data import ImageSet, balanced_subset, load_dataset
from onp_core.subjects import Subject, SubjectSpec, cached_subject

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CIFAR_BADNETS = SubjectSpec(arch="small_cnn", dataset="cifar10", attack="badnets", epochs=8)
FMNIST_BADNETS = SubjectSpec(arch="small_cnn", dataset="fashion_mnist", attack="badnets", epochs=4)
FMNIST_WANET = SubjectSpec(arch="small_cnn", dataset="fashion_mnist", attack="wanet", epochs=4)
FMNIST_CLEAN = SubjectSpec(arch="small_cnn", dataset="fashion_mnist", attack=None, epochs=2)
# a trigger shape, place, target, poison rate and seed ONP's defaults were never set on (bench ``triggers`` profile)
FMNIST_CHECKER = SubjectSpec(arch="small_cnn", dataset="fashion_mnist", attack="badnets", target=1, poison_rate=0.05,
                             epochs=4, seed=21,
                             attack_options={"pattern": "checker", "size": 4, "position": "top-left"})


_SUBJECT_FIXTURES = {"cifar_badnets_subject": CIFAR_BADNETS, "fmnist_badnets_subject": FMNIST_BADNETS,
                     "fmnist_clean_subject": FMNIST_CLEAN, "fmnist_wanet_subject": FMNIST_WANET,
                     "fmnist_checker_subject": FMNIST_CHECKER}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Train the subjects the selected tests need *before* any test starts.

    Training takes minutes; inside a fixture it would run under the first test's
    timeout (browser and service tests have short ones) and fail every test after it.
    """
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ())} & set(_SUBJECT_FIXTURES)
    for name in sorted(needed):
        cached_subject(_SUBJECT_FIXTURES[name])


@pytest.fixture(scope="session")
def cifar_badnets_subject() -> Subject:
    return cached_subject(CIFAR_BADNETS)


@pytest.fixture(scope="session")
def fmnist_badnets_subject() -> Subject:
    return cached_subject(FMNIST_BADNETS)


@pytest.fixture(scope="session")
def fmnist_wanet_subject() -> Subject:
    """A full-image, warp-shaped trigger: what the mask family alone did not detect."""
    return cached_subject(FMNIST_WANET)


@pytest.fixture(scope="session")
def fmnist_checker_subject() -> Subject:
    """A 4×4 checkerboard in the top-left corner, aimed at class 1, 5% poisoning: a held-out trigger."""
    return cached_subject(FMNIST_CHECKER)


@pytest.fixture(scope="session")
def fmnist_clean_subject() -> Subject:
    """A model trained without poisoning: the false-positive check."""
    return cached_subject(FMNIST_CLEAN)


@pytest.fixture(scope="session")
def cifar_clean_500() -> ImageSet:
    """The defender's clean set: 500 class-balanced CIFAR-10 training images (1%)."""
    return balanced_subset(load_dataset("cifar10", "train"), 500, seed=1)


@pytest.fixture(scope="session")
def fmnist_clean_500() -> ImageSet:
    return balanced_subset(load_dataset("fashion_mnist", "train"), 500, seed=1)
