#!/usr/bin/env bash
# Train the toy model's dictionary suite and print its metrics as a markdown table:
#   residual SAEs (gated) at every layer, attention-output SAEs and transcoders at the layers
#   around the task-vector layer (CIRCUIT_LAYERS, default "2,3,4").
# Every dictionary is an artifact (named toy-resid.L, toy-attn.L, toy-transcoder.L).
set -euo pipefail
cd "$(dirname "$0")/.."
ICL=${ICL:-.venv/bin/icl}
PY=${PY:-.venv/bin/python}
TOKENS=${SAE_TOKENS:-1000000}
CIRCUIT_LAYERS=${CIRCUIT_LAYERS:-2,3,4}
out=$(mktemp)
for spec in "resid all" "attn $CIRCUIT_LAYERS" "transcoder $CIRCUIT_LAYERS"; do
  set -- $spec
  $ICL --json train-sae --model toy-icl --site "$1" --layer "$2" --arch gated --tokens "$TOKENS" \
       --batch-tokens 1024 --lr 1e-3 --l1 "${SAE_L1:-1}" --name "toy-$1" | "$PY" -c '
import json, sys
data = json.load(sys.stdin)
for r in data if isinstance(data, list) else [data]:
    print(json.dumps({"site": sys.argv[1], **r}))' "$1" >> "$out"
done
"$PY" - "$out" <<'PYEOF'
import json, os, sys
from icl_cli.store import Store
store = Store(os.environ.get("ICL_STORE", "artifacts"))
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    r["layer"] = store.get(r["key"]).params["layer"]
print("| site | layer | L0 | FVU | dead | CE recovered | key |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    m = r["metrics"]
    print(f"| {r['site']} | {r['layer']} | {m['l0']:.1f} | {m['fvu']:.3f} | {m['dead_fraction']:.3f} | {m['ce_recovered']:.3f} | {r['key'][:12]} |")
PYEOF
rm -f "$out"
