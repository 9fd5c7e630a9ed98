"""Generators of hostile uploads (built at test time in ``tmp_path``, never committed as binaries)."""
