"""Speed of one task-vector cleaning step against full passes of the same batch.

    python benchmarks/clean_step.py                                   # the toy model's shape
    python benchmarks/clean_step.py --layers 18 --d-model 1024 --layer 12   # a mid-size random Gemma

A cleaning step (``icl_cli.clean.cleaning.clean_step``, the function ``clean`` runs) runs only the blocks
from the TV layer l on: the residual below is computed once. Three things are timed in the same
run, interleaved, and their medians compared:

    clean step     clean_step itself: blocks >= l forward and backward, the loss, the SAE
    naive step     the same loss from a full forward with the edit at resid_pre[l]; autograd
                   already stops at l, so only the forward of blocks < l is extra
    full fwd+bwd   the full forward and a backward through every block (the edit at resid_pre[0])

The ideal ratios come from FLOPs per token (forward of a block = 2·its parameters + attention
4·P·D, unembedding 2·D·V; a backward that only needs input gradients costs one forward; the
clean step unembeds only the n_first answer positions, the two references every position):
clean/full → (n − l)/n and clean/naive → 2(n − l)/(2n − l) when the unembedding is small beside
the blocks. The SAE decodes one vector per step, so its cost is negligible at any width.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icl_cli.clean.cleaning import activation, clean_step, steer_mask
from icl_cli.core.metrics import nll
from icl_cli.core.prompts import sample_prompts
from icl_cli.core.sites import HookedModel, Site, add_at
from icl_cli.core.steering import BaseCache
from icl_cli.core.tasks import builtin_tasks
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.zoo.toy_icl import ToyConfig, build_model, build_tokenizer


def random_gemma(n_layers: int, d_model: int, d_mlp: int, n_heads: int, kv_heads: int, vocab: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
    """A random Gemma-1 ``GemmaForCausalLM`` (eager attention, frozen) built from a config."""
    import transformers as tr

    cfg = tr.GemmaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=kv_heads, head_dim=d_model // n_heads,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return tr.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)


def ideal(model, n: int, layer: int, P: int, n_first: int) -> dict[str, float]:
    """FLOP-count ratios: clean/full and clean/naive (per token; see the module docstring). The
    clean step unembeds only the n_first answer positions of each prompt of P tokens."""
    cfg = model.config
    block = 2 * sum(p.numel() for p in model.model.layers[0].parameters()) + 4 * P * cfg.hidden_size
    unemb = 2 * cfg.hidden_size * cfg.vocab_size
    clean = 2 * ((n - layer) * block + unemb * n_first / P)
    naive = (n * block + unemb) + ((n - layer) * block + unemb)
    full = 2 * (n * block + unemb)
    return {"full": clean / full, "naive": clean / naive, "unembed_blocks": unemb / block}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="random Gemma with this many layers (default: the toy shape)")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-mlp", type=int, default=None, help="default 4 × d_model")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=1, help="Gemma-1 2B uses multi-query attention")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--layer", type=int, default=None, help="TV layer (default: 2/3 of the depth, the paper's 12 of 18)")
    ap.add_argument("--d-sae", type=int, default=None, help="default 16 × d_model")
    ap.add_argument("--arch", default="gated")
    ap.add_argument("--n-prompts", type=int, default=24, help="the paper's 24 training prompts")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tasks = builtin_tasks()
    tok = build_tokenizer(tasks)
    if args.layers is None:
        cfg = ToyConfig()
        model = build_model(cfg, tok).eval().requires_grad_(False)
        shape = f"toy shape: {cfg.n_layers} layers, d_model {cfg.d_model}, d_mlp {cfg.d_mlp}, vocab {len(tok)}"
    else:
        d_mlp = args.d_mlp or 4 * args.d_model
        model = random_gemma(args.layers, args.d_model, d_mlp, args.heads, args.kv_heads, max(args.vocab, len(tok)))
        shape = (f"random Gemma: {args.layers} layers, d_model {args.d_model}, d_mlp {d_mlp}, {args.heads} heads "
                 f"({args.kv_heads} kv), vocab {model.config.vocab_size}")
    hm = HookedModel(model)
    n, D = hm.n_layers, hm.d_model
    layer = args.layer if args.layer is not None else round(n * 12 / 18)
    sae = build(DictConfig(d_in=D, d_sae=args.d_sae or 16 * D, arch=args.arch, site="resid_pre", layer=layer))
    sae.requires_grad_(False)
    prompts = sample_prompts(tasks["antonyms"].pairs, args.n_prompts, 0, seed=0, with_answer=True)
    cache = BaseCache.build(hm, tok, prompts, [layer, 0])
    b = cache.batch
    mask = steer_mask(b, False)
    theta = sae.encode_pre(torch.randn(D)).detach().requires_grad_(True)
    act = activation(sae)

    def clean():
        clean_step(hm, sae, cache, layer, theta, 0.05, mask, act).backward()

    def naive():
        a = act(theta)
        edit = {Site("resid_pre", layer): add_at(sae.decode(a), mask)}
        (nll(hm.run(b.input_ids, b.attention_mask, edit=edit, grad=True).logits, b) + 0.05 * a.abs().sum()).backward()

    def full():
        a = act(theta)
        edit = {Site("resid_pre", 0): add_at(sae.decode(a), mask)}
        (nll(hm.run(b.input_ids, b.attention_mask, edit=edit, grad=True).logits, b) + 0.05 * a.abs().sum()).backward()

    fns = {"clean step": clean, "naive step": naive, "full fwd+bwd": full}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for label, fn in fns.items():
            theta.grad = None
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    P = b.input_ids.shape[1]
    print(f"{shape}; TV layer {layer}; {args.arch} SAE of {sae.cfg.d_sae} features; {len(b)} prompts × {P} tokens "
          f"(padded); {args.threads} thread(s)")
    for k, v in med.items():
        print(f"{k:>14}: {v * 1e3:8.1f} ms (median of {args.repeats})")
    want = ideal(model, n, layer, P, b.answer_pos.shape[1])
    print(f"clean / full fwd+bwd: {med['clean step'] / med['full fwd+bwd']:.3f}   (ideal from FLOPs {want['full']:.3f}; "
          f"blocks run {n - layer}/{n} = {(n - layer) / n:.3f})")
    print(f"clean / naive step:   {med['clean step'] / med['naive step']:.3f}   (ideal from FLOPs {want['naive']:.3f})")
    print(f"the unembedding costs {want['unembed_blocks']:.2f} blocks per token")


if __name__ == "__main__":
    main()
