#!/usr/bin/env bash
# Run the whole test suite against the real PostgreSQL and Redis (started if down).
# Backdoored subjects are trained once per run into $ONP_CACHE_DIR and shared by all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh >/dev/null
export ONP_CACHE_DIR="${ONP_CACHE_DIR:-$PWD/var/cache}"
mkdir -p "$ONP_CACHE_DIR" test-artifacts
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
