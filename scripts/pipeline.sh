#!/usr/bin/env bash
# The whole paper on the bundled toy model, offline on a CPU, chained the way people script icl
# (`KEY=$(icl -q ...)`). It makes the same artifacts as `icl pipeline` (one process, quicker to
# rerun); copy it and change a step to try other settings.
#   1. collect          task vectors, detector vectors and the layer sweep for every built-in task
#   2. SAEs             residual SAEs at the task-vector layer l and at l − 1: the bundled toy suite
#                       when it is installed, else trained here (gated, the paper's architecture)
#   3. clean            task vectors at l (executors) and detector vectors at l − 1 (detectors)
#   4. top-activations  max-activating contexts of each task's top two cleaned features
#   5. steer            the executor heatmap at l and detector steering at l − 1
#   6. ablate           activation mass by role (executors, detectors), the cross-task matrix,
#                       the detector → executor link
#   7. circuit          sparse feature circuits for a few tasks, then their faithfulness curves
#                       and cross-task matrix (`icl ablate --circuit`)
#   8. report           figures, report/index.html, the headline findings beside the paper's
# Every step is an artifact in the store (./artifacts, or ICL_STORE); a rerun reuses them all.
# Environment [default]: ICL [.venv/bin/icl], MODEL [toy-icl], TASKS [two per task group; all: the 23], SWEEP_LAYERS [all],
# LAYER [where most tasks' task vectors work best], SUITE [toy-icl-suite], CIRCUIT_TASKS [antonyms,en_es,location_continent],
# CIRCUIT_LAYERS [2-4], CLEAN_L1 [0.005; or auto], DETECTOR_L1 [0.005], EXECUTOR_SCALE [15], DETECTOR_SCALE [25], SWEEP_L1 [none; e.g. 0.001,0.02], SAE_TOKENS [300000], OUT [report].
# These defaults are toy-icl's profile; `icl pipeline --model M` takes M's profile from icl_cli/zoo/profiles.py, which
# for smollm2-135m also sets clean's training prompts, the circuits' prompts and shots and top-activations' tokens
# (here the steps' own defaults); the rest of SmolLM2's profile as variables:
#   MODEL=smollm2-135m TASKS=present_simple_past_simple,fr_en,location_continent,algo_last SWEEP_LAYERS=12-26 LAYER=21 \
#   SUITE=smollm2-suite CIRCUIT_TASKS=present_simple_past_simple,location_continent,algo_last CIRCUIT_LAYERS=19-21 \
#   CLEAN_L1=0.05 DETECTOR_L1=0.01 EXECUTOR_SCALE=45 DETECTOR_SCALE=75 scripts/pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ICL=${ICL:-.venv/bin/icl}
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-toy-icl}
TASKS=${TASKS:-antonyms,singular_plural,en_es,en_fr,location_continent,location_religion,algo_last,algo_second}
SUITE=${SUITE:-toy-icl-suite}
CIRCUIT_TASKS=${CIRCUIT_TASKS:-antonyms,en_es,location_continent}
OUT=${OUT:-report}
started=$(date +%s)
step() { echo "== [$(( $(date +%s) - started ))s] $*" >&2; }
json() { "$PY" -c "import json, sys; d = json.load(sys.stdin); print($1)"; }

step "collect: task vectors and the layer sweep ($MODEL, tasks: $TASKS)"
TV=$($ICL -q collect --model "$MODEL" --tasks "$TASKS" --layers "${SWEEP_LAYERS:-all}" --name pipeline-tv)
if [ -z "${LAYER:-}" ]; then
  LAYER=$($ICL --json collect --model "$MODEL" --tasks "$TASKS" --layers "${SWEEP_LAYERS:-all}" \
          | json '__import__("collections").Counter(t["best_layer"] for t in d["tasks"].values()).most_common(1)[0][0]')
fi
PREV=$((LAYER - 1))

HAVE_SUITE=0
SUITE_JSON=$($ICL --json store import-suite "$SUITE" 2>/dev/null) && HAVE_SUITE=1
if [ $HAVE_SUITE = 1 ] && [ "$(echo "$SUITE_JSON" | json 'd["model"]')" = "$MODEL" ] \
   && SAE=$(echo "$SUITE_JSON" | json "[x['key'] for x in d['dictionaries'] if (x['kind'], x['layer']) == ('resid', $LAYER)][0]" 2>/dev/null) \
   && SAE_PREV=$(echo "$SUITE_JSON" | json "[x['key'] for x in d['dictionaries'] if (x['kind'], x['layer']) == ('resid', $PREV)][0]" 2>/dev/null); then
  step "SAEs: the residual SAEs of suite $SUITE at layers $PREV and $LAYER"
else
  step "train-sae: gated residual SAEs at layers $PREV and $LAYER"
  # toy-sized: 300k tokens in batches of 1024 at lr 1e-3 (the paper's 300M tokens at 4e-4 are for Gemma)
  KEYS=$($ICL -q train-sae --model "$MODEL" --layer "$PREV,$LAYER" --site resid --arch gated \
          --tokens "${SAE_TOKENS:-300000}" --batch-tokens 1024 --lr 1e-3 --l1 1 --dataset tasks --name pipeline-sae)
  SAE_PREV=$(echo "$KEYS" | sed -n 1p)
  SAE=$(echo "$KEYS" | sed -n 2p)
fi

# λ 0.005: the toy SAEs' activations are larger than Gemma's, and the paper's 0.05 prunes the task
# vectors to a handful of features that no longer carry the task (README)
step "clean: task vectors at layer $LAYER (executors)"
CLEAN_ARGS=(--tv "$TV" --sae "$SAE" --l1 "${CLEAN_L1:-0.005}" ${SWEEP_L1:+--sweep-l1 "$SWEEP_L1"} --name pipeline-clean)
CLEAN=$($ICL -q clean "${CLEAN_ARGS[@]}")
step "clean: detector vectors at layer $PREV (detectors)"
DCLEAN=$($ICL -q clean --tv "$TV" --sae "$SAE_PREV" --detectors --l1 "${DETECTOR_L1:-0.005}" --name pipeline-clean-detectors)

step "top-activations: contexts of each task's top two cleaned features"
TOP_FEATURES=$($ICL --json clean "${CLEAN_ARGS[@]}" \
  | json '",".join(map(str, sorted({f for r in d["tasks"].values() for f in r["features"][:2]})))')
TOP=$($ICL -q collect top-activations --sae "$SAE" --features "$TOP_FEATURES" --name pipeline-top)

step "steer: executor heatmap at layer $LAYER"
EXEC_ARGS=(--clean "$CLEAN" ${EXECUTOR_SCALE:+--scale "$EXECUTOR_SCALE"})
DET_ARGS=(--clean "$DCLEAN" --mode detector ${DETECTOR_SCALE:+--scale "$DETECTOR_SCALE"})
EXEC=$($ICL -q steer "${EXEC_ARGS[@]}" --name pipeline-executors)
step "steer: detector steering at layer $PREV"
DET=$($ICL -q steer "${DET_ARGS[@]}" --name pipeline-detectors)
# the steering rule's executors and detectors; a step whose every set is empty is skipped (not
# measured: there is no fallback to other features)
N_EXEC=$($ICL --json steer "${EXEC_ARGS[@]}" | json 'sum(1 for v in d["executors"].values() if v)')
N_DET=$($ICL --json steer "${DET_ARGS[@]}" | json 'sum(1 for v in d["detectors"].values() if v)')
MASS_EXEC=; MASS_DET=; CROSS=; LINK=
[ "$N_EXEC" -gt 0 ] || echo "no task has executors by the steering rule: their steps are skipped" >&2
[ "$N_DET" -gt 0 ] || echo "no task has detectors by the steering rule: their steps are skipped" >&2
step "ablate: activation mass by token role (executors, detectors)"
[ "$N_EXEC" -gt 0 ] && MASS_EXEC=$($ICL -q ablate mass --features "$EXEC" --name pipeline-mass-executors)
[ "$N_DET" -gt 0 ] && MASS_DET=$($ICL -q ablate mass --features "$DET" --name pipeline-mass-detectors)
step "ablate: cross-task matrix (the executors of task A ablated at the arrows, task B measured)"
[ "$N_EXEC" -gt 1 ] && CROSS=$($ICL -q ablate --features "$EXEC" --roles arrow --cross-task --name pipeline-cross-task)
step "ablate: detector → executor link"
[ "$N_EXEC" -gt 0 ] && [ "$N_DET" -gt 0 ] && LINK=$($ICL -q ablate link --detectors "$DET" --executors "$EXEC" --name pipeline-link)

CIRCUITS=()
[ $HAVE_SUITE = 1 ] || { echo "no dictionary suite $SUITE, so no circuits (scripts/toy_saes.sh trains one)" >&2; CIRCUIT_TASKS=; }
for task in ${CIRCUIT_TASKS//,/ }; do
  step "circuit: $task"
  CIRCUITS+=("$($ICL -q circuit --model "$MODEL" --task "$task" --saes "$SUITE" --layers "${CIRCUIT_LAYERS:-2-4}" \
                 --name "pipeline-circuit-$task")")
done
FAITH=()
if [ ${#CIRCUITS[@]} -gt 0 ]; then
  CROSS_CIRCUITS=(); [ ${#CIRCUITS[@]} -gt 1 ] && CROSS_CIRCUITS=(--cross-task)
  step "faithfulness: curves of each circuit and the cross-task matrix"
  FAITH=("$($ICL -q ablate --circuit "$(IFS=,; echo "${CIRCUITS[*]}")" "${CROSS_CIRCUITS[@]}" --name pipeline-faithfulness)")
fi

step "report: figures and $OUT/index.html"
MEASURED=()
for k in "$MASS_EXEC" "$MASS_DET" "$CROSS" "$LINK"; do [ -n "$k" ] && MEASURED+=("$k"); done
$ICL report "$TV" "$SAE" "$SAE_PREV" "$CLEAN" "$DCLEAN" "$TOP" "$EXEC" "$DET" "${MEASURED[@]}" \
  "${CIRCUITS[@]}" "${FAITH[@]}" --out "$OUT" --brief
step "done"
