"""Throughput of `icl collect`'s library path against a plain Hugging Face forward of the same prompts.

    python benchmarks/collect_throughput.py                                   # toy-icl, the paper's settings
    python benchmarks/collect_throughput.py --layers 18 --d-model 1024 --n-shot 5   # a mid-size random Gemma

For one task, ``icl_cli.collect.vectors.collect_task`` (all layers, no SAEs) does two kinds of work:

    reads   task and detector vectors (resid_pre at every layer, arrow and output means) of the
            n_prompts few-shot prompts; the 0-shot base cache (resid_pre at every layer); the
            0-shot and few-shot held-out scores (full passes)
    sweep   per layer, the 0-shot prompts steered by TV[l] (added, then written) from resid_pre[l]
            on: 2·L partial passes, each unembedding only the answer positions

The reference is ``model(input_ids, attention_mask)`` under no_grad over the same batches (the
few-shot batch, the 0-shot batch, the few-shot held-out batch), once each. Tokens/s count real
(unpadded) prompt tokens, the same number on both sides. All four timings (whole collect_task,
its reads, its sweep, the plain forward) are interleaved in one run; ratios are of medians.
The sweep costs 2·Σ_l ((n − l)·block + (J/P)·unembedding) / (n·block + unembedding) plain passes of the
0-shot batch (FLOPs per token: block = 2·its parameters + attention, unembedding 2·D·V; J answer
positions of P are unembedded). The held-out scores (``plain_scores``) unembed only answer positions too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icl_cli.collect.vectors import collect_task, task_split
from icl_cli.collect.artifact import CollectParams
from icl_cli.core.batch import encode_prompts
from icl_cli.core.prompts import sample_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.steering import BaseCache, mean_at_role, plain_scores, scores, steered_answers
from icl_cli.core.tasks import builtin_tasks


def prompts_of(task, p: CollectParams):
    """The three prompt sets collect_task builds (the same calls, the same seeds)."""
    train, heldout = task_split(task, p.n_eval, p.seed)
    few = sample_prompts(train, p.n_prompts, p.n_shot, p.seed, p.template, with_answer=True, task_name=task.name)
    zero = sample_prompts(task.pairs, p.n_eval, 0, p.seed + 1, p.template, queries=heldout, task_name=task.name)
    fs_eval = sample_prompts(task.pairs, p.n_eval, p.n_shot, p.seed + 2, p.template, queries=heldout,
                             task_name=task.name)
    return few, zero, fs_eval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="random Gemma with this many layers (default: toy-icl)")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-mlp", type=int, default=None, help="default 4 × d_model")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--n-shot", type=int, default=19, help="paper: 19")
    ap.add_argument("--n-prompts", type=int, default=16, help="paper: 16")
    ap.add_argument("--n-eval", type=int, default=32, help="paper: 32")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from icl_cli.zoo.toy_icl import build_tokenizer

    tasks = builtin_tasks()
    if args.layers is None:
        from icl_cli.core.models import load_model

        lm = load_model("toy-icl", device="cpu", dtype="float32")
        model, tok = lm.model, lm.tokenizer
        shape = f"toy-icl ({model.config.num_hidden_layers} layers, d_model {model.config.hidden_size})"
    else:
        from clean_step import random_gemma  # benchmarks/ is on sys.path when run as a script

        tok = build_tokenizer(tasks)
        d_mlp = args.d_mlp or 4 * args.d_model
        model = random_gemma(args.layers, args.d_model, d_mlp, 8, 1, max(args.vocab, len(tok)))
        shape = (f"random Gemma ({args.layers} layers, d_model {args.d_model}, d_mlp {d_mlp}, "
                 f"vocab {model.config.vocab_size})")
    hm = HookedModel(model)
    layers = list(range(hm.n_layers))
    task = tasks[args.task]
    p = CollectParams(n_shot=args.n_shot, n_prompts=args.n_prompts, n_eval=args.n_eval)
    few, zero, fs_eval = prompts_of(task, p)
    batches = [encode_prompts(tok, ps, n_first=p.n_first) for ps in (few, zero, fs_eval)]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    cache = BaseCache.build(hm, tok, zero, layers, p.n_first)
    tv = mean_at_role(hm, tok, few, layers, ("arrow",))["arrow"]

    def whole():
        collect_task(hm, tok, task, layers, p)

    def reads():  # collect_task's calls before the sweep
        mean_at_role(hm, tok, few, layers, ("arrow", "output"))
        BaseCache.build(hm, tok, zero, layers, p.n_first)
        plain_scores(hm, tok, zero, p.n_first)
        plain_scores(hm, tok, fs_eval, p.n_first)

    @torch.no_grad()
    def sweep():  # collect_task's layer sweep
        for mode in ("add", "replace"):
            for j, l in enumerate(layers):
                scores(*steered_answers(hm, cache, l, tv[j], mode))

    @torch.no_grad()
    def plain():
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    @torch.no_grad()
    def plain_zero():  # one plain pass of the 0-shot batch: the sweep's unit
        model(input_ids=batches[1].input_ids, attention_mask=batches[1].attention_mask, use_cache=False)

    fns = {"collect_task": whole, "reads": reads, "sweep": sweep, "plain forward": plain, "plain 0-shot": plain_zero}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for i in range(args.repeats):
        order = list(fns.items())
        for label, fn in (order if i % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    shapes = ", ".join(f"{len(b)}×{b.input_ids.shape[1]}" for b in batches)
    print(f"{shape}; task {task.name}; all {hm.n_layers} layers; {p.n_prompts} few-shot prompts of {p.n_shot} shots, "
          f"{p.n_eval} held-out 0-shot and {p.n_eval} few-shot; batches {shapes} (prompts × padded tokens), "
          f"{tokens} real tokens; {args.threads} thread(s); medians of {args.repeats}")
    for k in ("collect_task", "reads", "plain forward"):
        print(f"{k:>14}: {med[k] * 1e3:9.1f} ms  {tokens / med[k]:9.0f} tokens/s")
    print(f"{'sweep':>14}: {med['sweep'] * 1e3:9.1f} ms  ({2 * hm.n_layers} steered passes of the 0-shot batch)")
    print(f"collect_task / plain forward: {med['collect_task'] / med['plain forward']:.2f}× the time")
    print(f"reads / plain forward:        {med['reads'] / med['plain forward']:.2f}× the time (the same passes, "
          f"unembedding only answer positions, plus the 0-shot base cache of {med['plain 0-shot'] / med['plain forward']:.2f})")
    n, P, cfg = hm.n_layers, batches[1].input_ids.shape[1], model.config
    block = 2 * sum(x.numel() for x in hm._loc.blocks[0].block.parameters()) + 4 * P * cfg.hidden_size
    unemb = 2 * cfg.hidden_size * cfg.vocab_size
    J = batches[1].answer_pos.shape[1]
    want = 2 * sum((n - l) * block + J / P * unemb for l in layers) / (n * block + unemb)
    print(f"sweep / plain 0-shot pass:    {med['sweep'] / med['plain 0-shot']:.1f} passes (ideal from FLOPs "
          f"2·Σ_l((n−l)·block + (J/P)·unembedding)/(n·block + unembedding) = {want:.1f}; blocks alone {n + 1})")


if __name__ == "__main__":
    main()
