"""collect's layer sweep from cached residuals, against the plain passes it ideally costs.

    python benchmarks/layer_sweep.py                          # random Gemmas of 18 and 30 layers, tiny widths
    python benchmarks/layer_sweep.py --model smollm2-135m     # a real model (the installed wheel's GGUF)
    python benchmarks/layer_sweep.py --n-layers 26 --d-model 256

For one task's 32 held-out 0-shot prompts and a task vector per layer, the sweep is

    cache     one pass over the prompts keeping resid_pre at every layer (``BaseCache.build``)
    sweep     for every layer l and both modes (vector added, vector written), blocks l … n−1 run
              from the cached resid_pre[l] with the vector at the query's arrow, then the answer
              positions unembedded

timed as collect runs it now (``sweep_scores``: the partial passes batched over layers) and as it
ran before (one ``steered_answers`` pass per layer and mode), against one plain pass over the same
prompts: the decoder alone (``model.model``: embedding, every block, final norm; no unembedding,
which the sweep only applies to the answer positions). The ideal is 1 + 2·Σ_l (n − l)/n plain
passes (the cache, then every block the sweep must run, for 2 modes). All timings interleaved in one
run; ratios of medians. The last line is the largest measured / ideal over the models.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icl_cli.core.prompts import sample_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.steering import BaseCache, mean_at_role, scores, steered_answers, sweep_scores
from icl_cli.core.tasks import builtin_tasks

MODES = ("add", "replace")


def measure(label: str, model, tok, args) -> float:
    hm = HookedModel(model)
    task = builtin_tasks()[args.task]
    layers = list(range(hm.n_layers))
    zero = sample_prompts(task.pairs, args.n_eval, 0, 1, "paper", task_name=task.name)
    few = sample_prompts(task.pairs, 8, 5, 0, "paper", with_answer=True, task_name=task.name)
    tv = mean_at_role(hm, tok, few, layers, ("arrow",))["arrow"]
    b = BaseCache.build(hm, tok, zero, layers).batch

    def batched():
        sweep_scores(hm, BaseCache.build(hm, tok, zero, layers), layers, tv, MODES)

    def per_layer():
        cache = BaseCache.build(hm, tok, zero, layers)
        for mode in MODES:
            for j, l in enumerate(layers):
                scores(*steered_answers(hm, cache, l, tv[j], mode))

    def plain():
        model.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    fns = {"sweep (batched)": batched, "sweep (per layer)": per_layer, "plain pass": plain}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for i in range(args.repeats):
            for k, fn in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = hm.n_layers
    ideal = 1 + len(MODES) * sum((n - l) / n for l in layers)
    now, before = med["sweep (batched)"] / med["plain pass"], med["sweep (per layer)"] / med["plain pass"]
    print(f"{label}; {len(zero)} prompts × {b.input_ids.shape[1]} tokens; {n} layers swept, {len(MODES)} modes; "
          f"plain pass {1e3 * med['plain pass']:.1f} ms; medians of {args.repeats}")
    print(f"  batched over layers: {now:6.1f} plain passes ({now / ideal:.2f}× ideal {ideal:.1f})")
    print(f"  one pass per layer:  {before:6.1f} plain passes ({before / ideal:.2f}× ideal)")
    return now / ideal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a model name or preset instead of the random Gemmas")
    ap.add_argument("--n-layers", default="18,30", help="random Gemmas with these layer counts")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--n-eval", type=int, default=32, help="held-out 0-shot prompts (paper: 32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    worst = 0.0
    if args.model:
        from icl_cli.core.models import load_model

        lm = load_model(args.model, device="cpu", dtype="float32")
        cfg = lm.model.config
        worst = measure(f"{args.model} ({cfg.num_hidden_layers} layers, d_model {cfg.hidden_size})", lm.model,
                        lm.tokenizer, args)
    else:
        from clean_step import random_gemma  # benchmarks/ is on sys.path when run as a script

        from icl_cli.zoo.toy_icl import build_tokenizer

        tok = build_tokenizer(builtin_tasks())
        for n in (int(x) for x in args.n_layers.split(",")):
            model = random_gemma(n, args.d_model, 4 * args.d_model, 4, 4, len(tok))
            label = f"random Gemma ({n} layers, d_model {args.d_model}, vocab {len(tok)}), {args.threads} thread(s)"
            worst = max(worst, measure(label, model, tok, args))
    print(f"sweep_over_ideal: {worst:.2f}")


if __name__ == "__main__":
    main()
