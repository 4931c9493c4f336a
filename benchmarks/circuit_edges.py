"""Batched edges (one seed per row of a tiled batch) against one backward per downstream node.

    .venv/bin/python benchmarks/circuit_edges.py                       # toy-icl, toy-icl-suite if present
    .venv/bin/python benchmarks/circuit_edges.py --nodes 600 --edge-rows 1024 --threads 2

Prints time(batched) / time(one backward per node) on the same circuit (target ≤ 0.1 at ≥ 256
downstream nodes), the peak working memory of both (CPU: rise of the peak resident set, measured
with malloc returning freed memory at once; CUDA: peak allocation), and the largest difference
between the two results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # freed tensors leave the resident set at once
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-icl")
    ap.add_argument("--saes", default="toy-icl-suite", help="suite; random dictionaries when it is not installed")
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--n-shot", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=400, help="selected feature nodes (top |IE|)")
    ap.add_argument("--edge-rows", type=int, default=1024, help="rows of one batched pass")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    import torch

    from icl_cli.circuit.attribution import node_scores
    from icl_cli.circuit.compute import CircuitParams, prompt_batch
    from icl_cli.circuit.edges import edges, upstream
    from icl_cli.circuit.estimate import measure_peak
    from icl_cli.circuit.faithfulness import Ranking
    from icl_cli.core.models import load_model
    from icl_cli.core.sites import HookedModel
    from icl_cli.core.tasks import resolve_tasks

    torch.set_num_threads(a.threads)
    lm = load_model(a.model, device=a.device)
    try:
        from icl_cli.dictionaries.suite import load_suite

        suite = load_suite(a.saes)
        dicts = {k: suite[k].to(lm.device).requires_grad_(False) for k in suite}
        what = a.saes
    except Exception as exc:  # noqa: BLE001 - fall back to random dictionaries of the same shape
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.circuit.helpers import tiny_suite

        dicts = tiny_suite(lm.d_model, range(lm.n_layers), d_sae=16 * lm.d_model)
        what = f"random dictionaries (d_sae {16 * lm.d_model}; {a.saes}: {exc})"
    hm = HookedModel(lm.model)
    _, batch = prompt_batch(lm.tokenizer, resolve_tasks(a.task)[0], CircuitParams(a.n_prompts, a.n_shot), None, lm.device)
    s = node_scores(hm, batch, dicts)
    r = Ranking.of(s.ie)
    sel: dict = {}
    for i in range(a.nodes):
        sel.setdefault(r.keys[int(r.key_idx[i])], []).append((int(r.group[i]), int(r.feature[i])))
    n_down = sum(len(v) for k, v in sel.items() if any(u in sel for u in upstream(k)))
    res = {}
    for name, kw in (("batched", {"max_rows": a.edge_rows}), ("per node", {"method": "per-node"})):
        box = {}

        def run(kw=kw, box=box):
            t0 = time.perf_counter()
            box["E"] = edges(hm, batch, dicts, s, sel, **kw)
            box["t"] = time.perf_counter() - t0

        peak = measure_peak(run, lm.device)
        res[name] = (box["t"], peak, {(e.src, e.dst): e.weight for e in box["E"]})
    (tb, pb, eb), (t1, p1, e1) = res["batched"], res["per node"]
    diff = max(abs(w - e1[k]) for k, w in eb.items())
    print(f"{a.model}, {what}: {a.n_prompts} prompts × {batch.input_ids.shape[1]} tokens, "
          f"{n_down} downstream nodes, {len(eb)} edges, {a.threads} thread(s) on {a.device}")
    print(f"batched ({a.edge_rows} rows per pass): {tb:.2f} s, peak {pb / 2**20:.0f} MiB")
    print(f"one backward per node:       {t1:.2f} s, peak {p1 / 2**20:.0f} MiB")
    print(f"time(batched) / time(per node) = {tb / t1:.3f}   (target ≤ 0.1);  max |difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
