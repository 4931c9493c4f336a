#!/usr/bin/env bash
# The paper pipeline on the bundled toy model, offline on a CPU:
#   1. collect   task vectors, detector vectors and the layer sweep for every built-in task
#   2. train-sae a gated residual SAE at the task-vector layer (the paper's architecture)
#   3. clean     task vector cleaning against the raw TV, the SAE reconstruction and gradient pursuit
# Every step is an artifact in the store (./artifacts); running the script again reuses them.
# Environment: ICL (the icl command), MODEL (default toy-icl), LAYER (default: the layer where the
# most tasks' task vectors work best), SAE_TOKENS (default 2000000), DATASET (SAE corpus, default:
# the task prompts).
set -euo pipefail
cd "$(dirname "$0")/.."
ICL=${ICL:-.venv/bin/icl}
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-toy-icl}

echo "== collect: task vectors and layer sweep ($MODEL)" >&2
TV=$($ICL -q collect --model "$MODEL" --tasks all --layers all --name pipeline-tv)
$ICL collect --model "$MODEL" --tasks all --layers all >&2   # (reused) the sweep table, for people

if [ -z "${LAYER:-}" ]; then
  LAYER=$($ICL --json collect --model "$MODEL" --tasks all --layers all | "$PY" -c '
import collections, json, sys
best = [t["best_layer"] for t in json.load(sys.stdin)["tasks"].values()]
print(collections.Counter(best).most_common(1)[0][0])')
fi
echo "== train-sae: gated residual SAE at layer $LAYER" >&2
SAE=$($ICL -q train-sae --model "$MODEL" --layer "$LAYER" --site resid --arch gated \
        --tokens "${SAE_TOKENS:-2000000}" --dataset "${DATASET:-tasks}" --name "pipeline-sae")

echo "== clean: task vector cleaning at layer $LAYER" >&2
$ICL clean --tv "$TV" --sae "$SAE" --name pipeline-clean
