"""Speed of the batched executor heatmap against one forward pass per (task, feature) cell.

    python benchmarks/steer_heatmap.py [--tasks 4] [--features 64] [--layer 5] [--repeats 3]

Three ways to fill the same tasks × features matrix of held-out 0-shot nll, timed in the same run
(interleaved, medians) on the bundled toy model with random unit directions:
  batched     ``icl steer``'s way: per task the residual below the layer is computed once and the
              features run in batched passes (cached residual repeated along the batch), blocks ≥ layer
  per cell    one full forward pass of the task's prompts per cell (the naive loop)
  per cell, cached   one pass per cell, but starting at the layer from the cached residual
The script prints the times, the ratios batched / per cell, and the largest difference between the
matrices (they must agree to float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icl_cli.core.metrics import nll
from icl_cli.core.models import load_model
from icl_cli.core.sites import HookedModel, Site, add_at
from icl_cli.core.steering import BaseCache, steered_logits
from icl_cli.core.tasks import builtin_tasks
from icl_cli.steer.heatmaps import PromptSource, SteerParams, heatmap_prompts, heatmap_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("toy-icl", device="cpu", dtype="float32")
    hm = HookedModel(lm.model)
    tasks = list(builtin_tasks().values())[: args.tasks]
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(args.features, hm.d_model, generator=g)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    p = SteerParams(scale=15.0, n_prompts=args.n_prompts, batch_size=args.batch_size)
    src = PromptSource(n_eval=32, seed=0)
    L = args.layer

    def batched():
        return torch.stack([heatmap_task(hm, lm.tokenizer, t, L, dirs, p, src).nll for t in tasks])

    @torch.no_grad()
    def per_cell(cached: bool):
        rows = []
        for t in tasks:
            cache = BaseCache.build(hm, lm.tokenizer, heatmap_prompts(t, args.n_prompts, src, False), [L])
            b = cache.batch
            mask = b.zero_shot_arrow_mask()
            row = []
            for u in dirs:
                if cached:
                    logits = steered_logits(hm, cache, L, u, scale=p.scale, mask=mask)
                else:
                    logits = hm.run(b.input_ids, b.attention_mask, edit={Site("resid_pre", L): add_at(u, mask, p.scale)}).logits
                row.append(nll(logits, b).item())
            rows.append(torch.tensor(row))
        return torch.stack(rows)

    fns = {"batched": batched, "per cell": lambda: per_cell(False), "per cell, cached": lambda: per_cell(True)}
    out = {k: fn() for k, fn in fns.items()}  # warm-up, and the matrices compared below
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cells = len(tasks) * args.features
    print(f"{len(tasks)} tasks × {args.features} features = {cells} cells, {args.n_prompts} prompts each, "
          f"layer {L} of {hm.n_layers}, {args.threads} thread(s), median of {args.repeats}")
    for k, v in med.items():
        print(f"{k:>18}: {v:7.3f} s  ({v / cells * 1e3:6.2f} ms per cell)")
    print(f"ratio batched / per cell: {med['batched'] / med['per cell']:.3f}")
    print(f"ratio batched / per cell, cached: {med['batched'] / med['per cell, cached']:.3f}")
    diff = max((out["batched"] - out[k]).abs().max().item() for k in ("per cell", "per cell, cached"))
    print(f"largest |Δ nll| between the matrices: {diff:.2e}")


if __name__ == "__main__":
    main()
