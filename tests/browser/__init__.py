"""Browser tests (a package for the same reason as tests/client)."""
