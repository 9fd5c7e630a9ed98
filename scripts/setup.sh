#!/usr/bin/env bash
# Set up a fresh machine: system data packages, a virtual environment with the project installed.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "warning: install ${need_apt[*]} with your package manager" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, torch_geometric, onp_core; print('torch', torch.__version__, 'ok')"
