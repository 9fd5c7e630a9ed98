"""Entry point of ``onp``: registers every command group on one typer app."""
from __future__ import annotations

import importlib

from onp_core.cli import app

# Modules that add commands to ``app`` when imported; missing ones are simply skipped
# so the engine CLI works on its own.
_COMMAND_MODULES = ("onp_cli.service_commands", "onp_cli.client_commands")

for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # pragma: no cover - only while a group is absent
        if exc.name != _name:
            raise


def main() -> None:
    app()


if __name__ == "__main__":
    main()
