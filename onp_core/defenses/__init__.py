"""Defenses behind one interface; ``get_defense(name)`` and ``run_repair`` are the entry points."""
from __future__ import annotations

from typing import Any

from ..data.dataset import ImageSet
from ..models import ImageClassifier
from .base import DefenseConfig, ProgressCallback, RepairCancelled, RepairResult

_REGISTRY: dict[str, str] = {
    "onp": "onp_core.defenses.onp.search",
    "anp": "onp_core.defenses.anp",
    "rnp": "onp_core.defenses.rnp",
    "clp": "onp_core.defenses.clp",
    "fp": "onp_core.defenses.fine_pruning",
}
METHODS = tuple(_REGISTRY)


def get_defense(name: str) -> Any:
    """The defense module for ``name``; it exposes ``repair``, ``Config`` and ``NAME``."""
    import importlib

    try:
        module_name = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; one of {', '.join(METHODS)}") from None
    return importlib.import_module(module_name)


def make_config(method: str, options: dict[str, Any] | None = None) -> DefenseConfig:
    """Validate method options (pydantic): unknown keys or bad values raise ``ValidationError``."""
    return get_defense(method).Config(**(options or {}))


def run_repair(model: ImageClassifier, clean: ImageSet, method: str = "onp", options: dict[str, Any] | None = None,
               progress: ProgressCallback | None = None) -> RepairResult:
    """Repair ``model`` with ``method`` using only the ``clean`` data."""
    defense = get_defense(method)
    return defense.repair(model, clean, make_config(method, options), progress)


__all__ = ["METHODS", "DefenseConfig", "ProgressCallback", "RepairCancelled", "RepairResult", "get_defense",
           "make_config", "run_repair"]
