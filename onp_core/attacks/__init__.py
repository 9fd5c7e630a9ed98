"""Backdoor attacks that make test subjects and measure ASR (never used by defenses)."""
from typing import Any

from .base import Attack
from .blended import Blended
from .patch import BadNets
from .sig import SIG
from .wanet import WaNet

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blended, WaNet, SIG)}


def make_attack(name: str, **kwargs: Any) -> Attack:
    try:
        return ATTACKS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}") from None


def attack_from_spec(spec: dict[str, Any]) -> Attack:
    """Rebuild an attack from the dict written by :meth:`Attack.spec`."""
    spec = dict(spec)
    return make_attack(spec.pop("attack"), **spec)


__all__ = ["ATTACKS", "Attack", "BadNets", "Blended", "SIG", "WaNet", "attack_from_spec", "make_attack"]
