#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything icl needs (CPU build of torch first, so
# that no multi-GB CUDA build is pulled in on machines without a GPU). Idempotent.
#   bash scripts/install.sh        # the tool
#   bash scripts/install.sh test   # the tool and the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/python -m pip install -q -e ".${extra}" 2>&1 | grep -vE '^WARNING: Location|^ *$' | grep -v 'wheel_obj\|!!\|strategy' || true
.venv/bin/python -c "import icl_cli, torch; print(f'icl ready (torch {torch.__version__})')" >&2
