"""Client tests (a package, so its conftest is imported as client.conftest and never shadows the
``conftest`` module that tests/service imports helpers from)."""
