#!/usr/bin/env bash
# Train the toy model's dictionary suite and ship it beside the model:
#   per layer a gated SAE on resid_pre, a gated SAE on attn_out and a gated transcoder
#   mlp_in -> mlp_out (SPEC §7), 2,048 features, 1M tokens of task prompts, batches of 1,024
#   tokens, lr 1e-3, L1 1; the dictionaries of one site train together on shared forward passes.
# Every dictionary is an artifact (named toy-resid.L, toy-attn.L, toy-transcoder.L); then the
# suite is written as float16 SAELens folders + manifest.json to $OUT (the bundled
# icl_cli/zoo/toy-icl-suite by default) and its metrics are printed as the README's table.
#
#   bash scripts/toy_saes.sh
#   ICL_STORE=/tmp/suite-store SAE_THREADS=1 bash scripts/toy_saes.sh   # a separate store, 1 thread
#   SKIP_TRAIN=1 bash scripts/toy_saes.sh    # only (re)write $OUT from the named artifacts
set -euo pipefail
cd "$(dirname "$0")/.."
ICL=${ICL:-.venv/bin/icl}
PY=${PY:-.venv/bin/python}
TOKENS=${SAE_TOKENS:-1000000}
LAYERS=${LAYERS:-all}
OUT=${OUT:-icl_cli/zoo/toy-icl-suite}
if [ -n "${SAE_THREADS:-}" ]; then export OMP_NUM_THREADS=$SAE_THREADS MKL_NUM_THREADS=$SAE_THREADS; fi
if [ -z "${SKIP_TRAIN:-}" ]; then
  for site in resid attn transcoder; do
    $ICL -q train-sae --model toy-icl --site "$site" --layer "$LAYERS" --arch gated --tokens "$TOKENS" \
         --batch-tokens 1024 --lr 1e-3 --l1 "${SAE_L1:-1}" --name "toy-$site" > /dev/null
  done
fi
"$PY" - "$OUT" <<'PYEOF'
import os, sys
from icl_cli.core.models import load_model
from icl_cli.dictionaries.suite import KINDS
from icl_cli.dictionaries.suite_build import write_suite
from icl_cli.core.errors import IclError
from icl_cli.store import Store

store = Store(os.environ.get("ICL_STORE", "artifacts"))
lm = load_model("toy-icl", device="cpu")
members = []
for kind in KINDS:
    for layer in range(lm.n_layers):
        for name in (f"toy-{kind}.{layer}", f"toy-{kind}"):  # a single layer's artifact has no suffix
            try:
                art = store.resolve(name, step="train-sae")
            except IclError:
                continue  # a layer not trained (LAYERS=...)
            if art.params["layer"] == layer:
                members.append((kind, layer, art))
                break
p = members[0][2].params
training = {k: p[k] for k in ("arch", "width", "tokens", "batch_tokens", "ctx", "lr", "l1", "dataset",
                              "buffer_batches", "eval_tokens", "seed") if k in p}
training["script"] = "scripts/toy_saes.sh"
m = write_suite(sys.argv[1], members, lm, name="toy-icl-suite", training=training)
first = m["dictionaries"][0]
print(f"CE on answer tokens, clean: {first['ce_clean']:.3f} nats; {len(members)} dictionaries in {sys.argv[1]}")
print("| dictionary | layer | L0 | FVU | FVU (fp16, check prompts) | dead | CE spliced | CE zero-ablated | CE recovered |")
print("|---|---|---|---|---|---|---|---|---|")
names = {"resid": "residual (`resid_pre`)", "attn": "attention output (`attn_out`)",
         "transcoder": "transcoder (`mlp_in → mlp_out`)"}
for kind in KINDS:
    for i, e in enumerate(x for x in m["dictionaries"] if x["kind"] == kind):
        print(f"| {names[kind] if i == 0 else ''} | {e['layer']} | {e['l0']:.1f} | {e['fvu']:.3f} | "
              f"{e['check_fvu']:.3f} | {e['dead_fraction']:.3f} | {e['ce_spliced']:.3f} | {e['ce_zero']:.2f} | "
              f"{e['ce_recovered']:.3f} |")
PYEOF
