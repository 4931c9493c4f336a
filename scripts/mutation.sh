#!/usr/bin/env bash
# Mutation testing of the method's modules (docs/MUTATION.md). Slow: not part of CI or the suite.
#
#   scripts/mutation.sh [COPY_DIR] [CHILDREN]      # default /tmp/icl-mutation, 2 workers
#
# Mutates a private copy of the repository (a git worktree of HEAD), never the checkout itself,
# with mutmut (installed into a venv of its own that sees this project's venv).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COPY=${1:-/tmp/icl-mutation}
CHILDREN=${2:-2}
VENV=${MUTMUT_VENV:-$COPY.venv}
PY=$ROOT/.venv/bin/python

if [ ! -x "$VENV/bin/mutmut" ]; then
  BASE=$("$PY" -c 'import sys; print(sys.base_prefix)')
  "$BASE/bin/python3" -m venv "$VENV"
  SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
  # the project's packages without its editable install (which would point back at $ROOT)
  echo "$SITE" > "$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/icl-venv.pth"
  "$VENV/bin/pip" install -q "mutmut>=3.8"
fi

git -C "$ROOT" worktree remove --force "$COPY" 2>/dev/null || rm -rf "$COPY"
git -C "$ROOT" worktree add --detach "$COPY" HEAD >/dev/null
# PROFILE=methods (default): the SAE, cleaning and metric modules; PROFILE=causal: circuits, ablation, steering
case "${PROFILE:-methods}" in
  methods)
    MODULES="icl_cli/core/metrics.py icl_cli/core/prompts.py icl_cli/clean/pursuit.py icl_cli/clean/cleaning.py icl_cli/collect/vectors.py
             icl_cli/dictionaries/base.py icl_cli/dictionaries/standard.py icl_cli/dictionaries/gated.py
             icl_cli/dictionaries/jumprelu.py icl_cli/dictionaries/topk.py icl_cli/dictionaries/authors.py
             icl_cli/train_sae/evaluate.py icl_cli/train_sae/trainer.py"
    TESTS="tests/formulas tests/test_pursuit.py tests/dictionaries/test_dictionaries.py tests/core/test_prompts.py" ;;
  causal)
    MODULES="icl_cli/circuit/attribution.py icl_cli/circuit/splice.py icl_cli/circuit/faithfulness.py
             icl_cli/circuit/edges.py icl_cli/ablate/feature_ablation.py icl_cli/ablate/mass.py icl_cli/ablate/link.py icl_cli/steer/heatmaps.py"
    TESTS="tests/circuit/test_attribution.py tests/circuit/test_splice.py tests/circuit/test_faithfulness.py
           tests/circuit/test_edges.py tests/test_ablate.py tests/test_steer.py tests/formulas/test_formula_ablate_steer.py" ;;
  *) echo "PROFILE must be methods or causal" >&2; exit 2 ;;
esac
{
  echo "[mutmut]"
  echo "source_paths=icl_cli"
  echo "only_mutate="; for m in $MODULES; do echo "    $m"; done
  cat <<'CFG'
do_not_mutate_patterns=
    raise IclError
    IclError\(
    progress\(
    log\(
CFG
  echo "pytest_add_cli_args_test_selection="; for t in $TESTS; do echo "    $t"; done
  cat <<'CFG'
pytest_add_cli_args=
    -p
    no:cacheprovider
    -q
    -x
mutate_only_covered_lines=true
process_isolation=forkserver
timeout_multiplier=30
timeout_constant=60
also_copy=
    icl_cli/zoo
    icl_cli/data
CFG
} > "$COPY/setup.cfg"
cd "$COPY"
# extra arguments after the first two: mutant name patterns, e.g. 'icl_cli.core.metrics.*'
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 "$VENV/bin/mutmut" run --max-children "$CHILDREN" "${@:3}" || true
"$PY" "$ROOT/scripts/mutation_score.py" "$COPY/mutants" --survivors
echo "inspect a survivor: (cd $COPY && $VENV/bin/mutmut show NAME)"
