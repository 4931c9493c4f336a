"""Speed of one task-vector cleaning step against a full forward+backward of the same batch.

    python benchmarks/clean_step.py [--layer 4] [--repeats 30]

A cleaning step runs only the blocks from the TV layer on (the residual below is computed once),
so its cost should be about (n_layers − layer) / n_layers of a full pass plus the SAE. Both are
timed in the same run, interleaved, on a model of the toy model's shape; the script prints the
medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icl_cli.clean import CleanParams, activation, steer_mask
from icl_cli.core.metrics import nll
from icl_cli.core.prompts import sample_prompts
from icl_cli.core.sites import HookedModel, Site, add_at
from icl_cli.core.steering import BaseCache, steered_logits
from icl_cli.core.tasks import builtin_tasks
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.zoo.toy_icl import ToyConfig, build_model, build_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tasks = builtin_tasks()
    tok = build_tokenizer(tasks)
    cfg = ToyConfig()
    model = build_model(cfg, tok).eval().requires_grad_(False)
    hm = HookedModel(model)
    sae = build(DictConfig(d_in=cfg.d_model, d_sae=16 * cfg.d_model, arch="gated", site="resid_pre", layer=args.layer))
    prompts = sample_prompts(tasks["antonyms"].pairs, 24, 0, seed=0)
    cache = BaseCache.build(hm, tok, prompts, [args.layer])
    mask = steer_mask(cache.batch, False)
    sae.requires_grad_(False)
    theta = sae.encode_pre(torch.randn(cfg.d_model)).detach().requires_grad_(True)
    act = activation(sae)
    b = cache.batch

    def clean_step():
        a = act(theta)
        loss = nll(steered_logits(hm, cache, args.layer, sae.decode(a), grad=True, mask=mask), b) + 0.05 * a.sum()
        loss.backward()

    def full_step():
        a = act(theta)
        edit = {Site("resid_pre", args.layer): add_at(sae.decode(a), mask)}
        loss = nll(hm.run(b.input_ids, b.attention_mask, edit=edit, grad=True).logits, b) + 0.05 * a.sum()
        loss.backward()

    times = {"clean step": [], "full forward+backward": []}
    for fn in (clean_step, full_step):
        fn()  # warm-up
    for _ in range(args.repeats):
        for label, fn in (("clean step", clean_step), ("full forward+backward", full_step)):
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>24}: {v * 1e3:7.2f} ms (median of {args.repeats})")
    print(f"ratio clean/full: {med['clean step'] / med['full forward+backward']:.3f} "
          f"(layer {args.layer} of {cfg.n_layers}; blocks run {cfg.n_layers - args.layer}/{cfg.n_layers})")


if __name__ == "__main__":
    main()
