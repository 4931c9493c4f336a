"""An activation harvest up to layer l against a plain forward pass through the blocks it needs.

    python benchmarks/harvest.py                              # random 18-layer Gemma, d_model 256
    python benchmarks/harvest.py --layers 30 --d-model 576 --repeats 5

Every step that reads activations (train-sae's buffer, top activations, collect's means, the
suite's check) stops the pass after the highest block it needs (``HookedModel.run(stop_after=)``;
a pass that reads only resid_pre[l] ends at block l's input). For a few layers l of a random
Gemma this times

    harvest   train-sae's ``ActivationSource.forward_chunks`` over one batch of chunks: read
              resid_pre[l] (an SAE's site; blocks 0..l-1), keep the non-pad non-BOS tokens
    harvest (transcoder)  the same with mlp_in[l] and mlp_out[l] (blocks 0..l)
    plain     the HF decoder itself (``model.model``) holding only the blocks the harvest needs,
              i.e. embedding, those blocks and the final norm, no unembedding

interleaved after a warm-up; ratios are of medians, measured in this run. The last line is the
largest ratio over the layers and reads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icl_cli.core.sites import HookedModel, Site
from icl_cli.train_sae.data import ActivationSource


def plain_upto(model, n_blocks: int, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """model.model (the decoder without the unembedding) with only its first n_blocks blocks."""
    base, blocks, n = model.model, model.model.layers, model.config.num_hidden_layers
    base.layers, model.config.num_hidden_layers = blocks[:n_blocks], n_blocks
    try:
        base(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        base.layers, model.config.num_hidden_layers = blocks, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=8, help="chunks per batch")
    ap.add_argument("--ctx", type=int, default=128, help="tokens per chunk")
    ap.add_argument("--at", default=None, help="comma-separated layers (default: 1, middle, last)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from clean_step import random_gemma  # benchmarks/ is on sys.path when run as a script

    n = args.layers
    model = random_gemma(n, args.d_model, 4 * args.d_model, 4, 4, args.vocab)
    hm = HookedModel(model)
    g = torch.Generator().manual_seed(0)
    chunks = [[1] + torch.randint(3, args.vocab, (args.ctx - 1,), generator=g).tolist() for _ in range(args.rows)]
    ids = torch.tensor(chunks)
    mask = torch.ones_like(ids)
    tok = type("Tok", (), {"pad_token_id": 0, "bos_token_id": 1})()
    at = [int(x) for x in args.at.split(",")] if args.at else sorted({1, n // 2, n - 1})

    cases = {}
    for l in at:
        for label, reads, n_blocks in ((f"resid_pre.{l}", [(Site("resid_pre", l), None)], l),
                                       (f"transcoder {l}", [(Site("mlp_in", l), Site("mlp_out", l))], l + 1)):
            src = ActivationSource(hm, tok, iter(()), reads, args.rows, "cpu", torch.float32)
            cases[label] = (lambda src=src: src.forward_chunks(chunks),
                            lambda k=n_blocks: plain_upto(model, k, ids, mask), n_blocks)

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    times = {k: ([], []) for k in cases}
    with torch.no_grad():
        for harvest, plain, _ in cases.values():
            harvest(), plain()
        for i in range(args.repeats):
            for k, (harvest, plain, _) in cases.items():
                pair = (harvest, plain) if i % 2 == 0 else (plain, harvest)
                ts = [timed(f) for f in pair]
                times[k][0].append(ts[0] if i % 2 == 0 else ts[1])
                times[k][1].append(ts[1] if i % 2 == 0 else ts[0])
    print(f"random Gemma ({n} layers, d_model {args.d_model}, d_mlp {4 * args.d_model}, vocab {args.vocab}); "
          f"batch {args.rows}×{args.ctx} tokens; {torch.get_num_threads()} thread(s); medians of {args.repeats}")
    worst = 0.0
    for k, (h, p) in times.items():
        r = statistics.median(h) / statistics.median(p)
        worst = max(worst, r)
        print(f"{k:>16}: harvest {1e3 * statistics.median(h):8.1f} ms  plain {cases[k][2]:2d} blocks "
              f"{1e3 * statistics.median(p):8.1f} ms  ratio {r:.3f}")
    print(f"harvest_over_plain: {worst:.3f}")


if __name__ == "__main__":
    main()
