"""Batched edges against the tiled batch of the previous version and one backward per node.

    .venv/bin/python benchmarks/circuit_edges.py                       # toy-icl, toy-icl-suite if present
    .venv/bin/python benchmarks/circuit_edges.py --nodes 600 --edge-rows 1024 --threads 2 --repeats 7

On the same circuit: the median time of each method over --repeats rounds (the methods
interleaved within a round, so load from other processes hits all of them alike), the ratio of
medians time(method) / time(one backward per node) (target ≤ 0.1 at ≥ 256 downstream nodes) and
the median of the per-round ratios, the largest difference from the per-node edges, and the peak
working memory of each method, measured once in a second process (CPU: rise of the peak
resident set with malloc returning freed memory at once, which would slow the timed runs;
CUDA: peak allocation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = {"batched": "batched (one forward, vmapped backward)", "tiled": "tiled batch (previous version)",
           "per-node": "one backward per node"}


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
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds of timing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)  # the memory-measuring child
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

    def run(m: str) -> list:
        return edges(hm, batch, dicts, s, sel, max_rows=a.edge_rows, method=m)

    if a.peak:
        print(json.dumps({m: measure_peak(lambda m=m: run(m), lm.device) for m in METHODS}))
        return

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    result = {}
    for _ in range(a.repeats):
        for m in METHODS:
            t0 = time.perf_counter()
            E = run(m)
            times[m].append(time.perf_counter() - t0)
            result[m] = {(e.src, e.dst): e.weight for e in E}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    child = subprocess.run([sys.executable, *sys.argv, "--peak"], env=env, capture_output=True, text=True, check=True)
    peak = json.loads(child.stdout.strip().splitlines()[-1])

    by_kind = {kind: sum(len(v) for k, v in sel.items() if k[0] == kind and any(u in sel for u in upstream(k)))
               for kind in ("resid", "attn", "transcoder")}
    one = result["per-node"]
    print(f"{a.model}, {what}: {a.n_prompts} prompts × {batch.input_ids.shape[1]} tokens, "
          f"{sum(by_kind.values())} downstream nodes ({', '.join(f'{k} {n}' for k, n in by_kind.items())}), "
          f"{len(one)} edges, {a.threads} thread(s) on {a.device}, "
          f"{a.edge_rows} rows per pass, median of {a.repeats} interleaved rounds")
    t1 = statistics.median(times["per-node"])
    for m, label in METHODS.items():
        t = statistics.median(times[m])
        per_round = statistics.median(x / y for x, y in zip(times[m], times["per-node"]))
        assert result[m].keys() == one.keys(), f"{m}: other edges than per node"
        diff = max(abs(w - one[k]) for k, w in result[m].items())
        print(f"{label:40s} {t:7.3f} s  ratio {t / t1:.3f} (per round {per_round:.3f})  "
              f"peak {peak[m] / 2**20:6.0f} MiB  max |Δ| vs per node {diff:.1e}")
    print("target: ratio ≤ 0.1")


if __name__ == "__main__":
    main()
