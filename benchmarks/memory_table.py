"""Memory of `circuit`, `clean` and `train-sae` at Gemma sizes, and the estimates checked against
measured peaks on scaled-down random Gemma models.

    python benchmarks/memory_table.py                # the table, then estimate vs measured
    python benchmarks/memory_table.py --table-only   # the table alone (no model is built)
    python benchmarks/memory_table.py --measure clean '{"n_layers": 6, ...}'   # one measurement

The table uses the analytic estimates (icl_cli/circuit/estimate.py, icl_cli/core/memory.py) with
bfloat16 weights and the paper's settings: circuits over 8 prompts of 16 shots with a residual,
an attention and a transcoder dictionary at every layer; cleaning with 24 training, 32 held-out
and 24 validation 0-shot prompts (λ auto) at layer 12 of Gemma-1 2B (13 of Gemma-2 2B, Gemma
Scope's layer 12 resid_post); train-sae with 4,096-token batches, a 16-batch buffer, ctx 128.
Prompt lengths are not measured (no Gemma tokenizer here): a pair is taken as 6 tokens, the
instruction and BOS as 8, so a 16-shot prompt has 104 tokens and a 0-shot one 14.

Each measurement runs in a fresh interpreter with glibc returning large frees at once
(MALLOC_MMAP_THRESHOLD_), one thread, and reads the rise of the process's peak resident set
over the call (``measure_peak``: /proc/self/clear_refs then VmHWM); the call runs once before it
is measured, so lazy imports are not counted. The estimate's working memory (everything beyond
the weights resident before the call) is compared with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

GEMMA1 = dict(family="gemma", n_layers=18, d_model=2048, d_mlp=16384, heads=8, kv=1, head_dim=256, vocab=256000)
GEMMA2 = dict(family="gemma2", n_layers=26, d_model=2304, d_mlp=9216, heads=8, kv=4, head_dim=256, vocab=256000)
PAIR_TOKENS, FIXED_TOKENS = 6, 8
GIB = 1 << 30
HERE = Path(__file__).resolve().parent


def hf_config(sz: dict):
    import transformers as tr

    common = dict(vocab_size=sz["vocab"], hidden_size=sz["d_model"], intermediate_size=sz["d_mlp"],
                  num_hidden_layers=sz["n_layers"], num_attention_heads=sz["heads"], num_key_value_heads=sz["kv"],
                  head_dim=sz["head_dim"])
    return tr.Gemma2Config(**common) if sz["family"] == "gemma2" else tr.GemmaConfig(**common)


def table() -> list[dict]:
    """Rows of the Gemma-size table (bfloat16 weights, the paper's settings)."""
    from icl_cli.circuit.estimate import Shapes, estimate
    from icl_cli.core.memory import ModelShape, clean_memory, train_sae_memory

    rows = []
    for name, sz, widths, layer, arch in (("Gemma-1 2B", GEMMA1, (16384, 32768), 12, "gated"),
                                          ("Gemma-2 2B", GEMMA2, (16384,), 13, "jumprelu")):
        s = ModelShape.of(hf_config(sz), 2)
        for F in widths:
            n = sz["n_layers"]
            shapes = Shapes(s.n_params, n, s.d_model, s.d_mlp, s.n_heads, s.vocab, 2, [(s.d_model, F, s.d_model)] * 3 * n, 0)
            c = estimate(shapes, 8, 16 * PAIR_TOKENS + FIXED_TOKENS)
            rows.append(dict(model=name, step="circuit", F=F, settings=f"8 prompts × {16 * PAIR_TOKENS + FIXED_TOKENS} "
                             f"tokens, {3 * n} dictionaries, atp, edge rows 256", resident=c.resident, working=c.peak,
                             phase=c.phase))
            e = clean_memory(s, F, layer, PAIR_TOKENS + FIXED_TOKENS)
            rows.append(dict(model=name, step="clean", F=F, settings=f"layer {layer}, 24/32/24 prompts × "
                             f"{PAIR_TOKENS + FIXED_TOKENS} tokens", resident=e.resident, working=e.peak, phase=e.phase))
            t = train_sae_memory(s, F, arch=arch)
            rows.append(dict(model=name, step="train-sae", F=F, settings=f"{arch}, batch 4096 tokens, buffer 16 batches, "
                             "ctx 128", resident=t.resident, working=t.peak, phase=t.phase))
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | step | features | settings | weights | working (peak phase) | total |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | `{r['step']}` | {r['F'] // 1024}k | {r['settings']} | {r['resident'] / GIB:.1f} GiB | "
              f"{r['working'] / GIB:.1f} GiB ({r['phase']}) | {(r['resident'] + r['working']) / GIB:.1f} GiB |")


# ---------------------------------------------------------------- measurements (one per process)

def _model(spec: dict):
    import torch

    from clean_step import random_gemma
    from icl_cli.core.tasks import builtin_tasks
    from icl_cli.zoo.toy_icl import build_tokenizer

    torch.set_num_threads(1)
    tasks = builtin_tasks()
    tok = build_tokenizer(tasks)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = random_gemma(spec["n_layers"], spec["d_model"], spec["d_mlp"], spec.get("heads", 4), spec.get("kv", 1),
                         max(spec["vocab"], len(tok)), dtype=dtype)
    return model, tok, tasks, dtype


def measure(step: str, spec: dict) -> dict:
    """{"estimate": working bytes, "measured": bytes, "phases": the estimate's phases} of one step."""
    import torch

    from icl_cli.circuit.estimate import measure_peak
    from icl_cli.core.memory import ModelShape
    from icl_cli.core.sites import HookedModel
    from icl_cli.dictionaries.base import DictConfig, build

    model, tok, tasks, dtype = _model(spec)
    s = ModelShape.of(model.config, torch.tensor([], dtype=dtype).element_size())
    hm = HookedModel(model)
    F = spec["d_sae"]
    if step == "clean":
        from icl_cli.clean.cleaning import CleanParams, _prompts, clean_task
        from icl_cli.collect.vectors import task_split
        from icl_cli.core.batch import encode_prompts
        from icl_cli.core.memory import clean_memory

        task, layer = tasks["antonyms"], spec["layer"]
        sae = build(DictConfig(d_in=s.d_model, d_sae=F, arch="gated", site="resid_pre", layer=layer)).requires_grad_(False)
        p = CleanParams(l1=0.05, max_steps=3, patience=3)
        v = torch.randn(s.d_model, generator=torch.Generator().manual_seed(0)).to(dtype)
        train, heldout = task_split(task, 32, 0)
        P = max(encode_prompts(tok, ps).input_ids.shape[1] for ps in (
            _prompts(train, train, p.n_train, p.seed + 3, False, "paper", task.name),
            _prompts(task.pairs, heldout, 32, 1, False, "paper", task.name)))

        def fn():
            clean_task(hm, tok, sae, task, layer, v, p, (32, 0))

        est = clean_memory(s, F, layer, P, p.n_train, 32, n_val=0)  # a fixed λ: no validation prompts
    elif step == "train-sae":
        import tempfile

        from icl_cli.core.memory import train_sae_memory
        from icl_cli.core.models import LoadedModel
        from icl_cli.train_sae.config import TrainConfig
        from icl_cli.train_sae.trainer import train_dictionaries

        words = [w for pair in tasks["antonyms"].pairs for w in pair]
        text = Path(tempfile.mkdtemp()) / "corpus.txt"
        g = torch.Generator().manual_seed(0)
        text.write_text("\n".join(" ".join(words[i] for i in torch.randint(len(words), (200,), generator=g).tolist())
                                  for _ in range(400)))
        bt, ctx, bb = spec["batch_tokens"], spec["ctx"], spec["buffer_batches"]
        cfg = TrainConfig(model="random", layers=[1], arch=spec["arch"], width=F, tokens=3 * bt, batch_tokens=bt, ctx=ctx,
                          buffer_batches=bb, dataset=str(text), eval_tokens=max(1, bt // ctx) * (ctx - 1),
                          checkpoint_every=0)
        lm = LoadedModel(model, tok, "random", "random", "gemma", s.n_layers, s.d_model, torch.device("cpu"), dtype)

        def fn():
            train_dictionaries(cfg, lm)

        est = train_sae_memory(s, F, arch=spec["arch"], batch_tokens=bt, buffer_batches=bb, ctx=ctx, store_bytes=4)
    elif step == "circuit":
        from icl_cli.circuit.attribution import node_scores
        from icl_cli.circuit.compute import CircuitParams, prompt_batch
        from icl_cli.circuit.edges import edges
        from icl_cli.circuit.estimate import Shapes, estimate
        from icl_cli.circuit.faithfulness import Ranking, ablated_metric

        kinds = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "transcoder"}
        dicts = {}
        for l in range(s.n_layers):
            for kind, site in kinds.items():
                # as tests/circuit/helpers.tiny_suite: a positive encoder bias, so features fire
                d = build(DictConfig(d_in=s.d_model, d_sae=F, arch="standard", site=site, layer=l))
                g = torch.Generator().manual_seed(l)
                d.reset_parameters(g)
                with torch.no_grad():
                    d.b_enc.uniform_(-0.1, 0.3, generator=g)
                    d.b_dec.normal_(0, 0.1, generator=g)
                dicts[(kind, l)] = d.requires_grad_(False).to(dtype)
        _, batch = prompt_batch(tok, tasks["antonyms"], CircuitParams(n_prompts=spec["n_prompts"], n_shot=spec["n_shot"]),
                                None)

        def fn():
            sc = node_scores(hm, batch, dicts)
            r = Ranking.of(sc.ie)
            ablated_metric(hm, batch, dicts, sc.groups, sc.base, r.mask(0, True))
            sel: dict = {}
            for i in range(min(300, len(r.key_idx))):
                sel.setdefault(r.keys[int(r.key_idx[i])], []).append((int(r.group[i]), int(r.feature[i])))
            edges(hm, batch, dicts, sc, sel, max_rows=128)

        shapes = Shapes(s.n_params, s.n_layers, s.d_model, s.d_mlp, s.n_heads, s.vocab, s.dtype_bytes,
                        [(s.d_model, F, s.d_model)] * len(dicts), 0)
        c = estimate(shapes, len(batch), batch.input_ids.shape[1], edge_rows=128)
        est = type("E", (), {"peak": c.peak, "phases": c.phases})
    else:
        raise SystemExit(f"unknown step {step!r}")
    fn()  # lazy imports, first-call caches
    measured = measure_peak(fn, "cpu")
    return {"estimate": est.peak, "measured": measured, "phases": est.phases}


def run_measure(step: str, spec: dict, timeout: int = 900) -> dict:
    """``measure`` in a fresh interpreter (so one measurement's memory never hides another's)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(HERE / "memory_table.py"), "--measure", step, json.dumps(spec)],
                         capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE.parent)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {step} {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


SCALED = {
    "clean": [dict(n_layers=6, d_model=256, d_mlp=1024, vocab=65536, d_sae=4096, layer=4),
              dict(n_layers=12, d_model=512, d_mlp=2048, vocab=131072, d_sae=8192, layer=8),
              dict(n_layers=12, d_model=512, d_mlp=2048, vocab=131072, d_sae=8192, layer=8, dtype="bfloat16"),
              dict(n_layers=12, d_model=512, d_mlp=2048, vocab=4096, d_sae=8192, layer=1),  # the step is the peak
              dict(n_layers=12, d_model=512, d_mlp=2048, vocab=4096, d_sae=8192, layer=1, dtype="bfloat16")],
    "train-sae": [dict(n_layers=4, d_model=128, d_mlp=512, vocab=32768, d_sae=2048, arch="gated", batch_tokens=1024,
                       ctx=64, buffer_batches=4),
                  dict(n_layers=4, d_model=256, d_mlp=1024, vocab=65536, d_sae=4096, arch="topk", batch_tokens=2048,
                       ctx=64, buffer_batches=8),
                  dict(n_layers=4, d_model=256, d_mlp=1024, vocab=32768, d_sae=8192, arch="jumprelu", batch_tokens=2048,
                       ctx=128, buffer_batches=8, dtype="bfloat16"),
                  dict(n_layers=2, d_model=128, d_mlp=512, vocab=4096, d_sae=16384, arch="gated", batch_tokens=2048,
                       ctx=128, buffer_batches=4)],  # the training step is the peak
    "circuit": [dict(n_layers=3, d_model=128, d_mlp=512, vocab=8192, d_sae=1024, n_prompts=4, n_shot=12),
                dict(n_layers=3, d_model=256, d_mlp=1024, vocab=32768, d_sae=2048, n_prompts=4, n_shot=16),
                dict(n_layers=4, d_model=256, d_mlp=1024, vocab=32768, d_sae=2048, n_prompts=4, n_shot=16)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--measure", nargs=2, metavar=("STEP", "SPEC_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], json.loads(args.measure[1]))))
        return
    print_table(table())
    if args.table_only:
        return
    print("\nestimate vs measured working memory (scaled-down random Gemma, CPU, one thread):")
    for step, specs in SCALED.items():
        for spec in specs:
            r = run_measure(step, spec)
            size = ", ".join(f"{k} {v}" for k, v in spec.items())
            print(f"{step:>9}: estimate {r['estimate'] / 2**20:7.1f} MiB, measured {r['measured'] / 2**20:7.1f} MiB, "
                  f"ratio {r['estimate'] / max(r['measured'], 1):.2f}  ({size}; phases "
                  + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r["phases"].items()) + " MiB)", flush=True)


if __name__ == "__main__":
    main()
