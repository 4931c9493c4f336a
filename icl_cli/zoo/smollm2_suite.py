"""Train SmolLM2-135M-Instruct's dictionary suite, `smollm2-suite`, and write it as float16 SAELens folders.

    python -m icl_cli.zoo.smollm2_suite                      # the shipped suite (icl_cli/zoo/smollm2-suite)
    python -m icl_cli.zoo.smollm2_suite --tokens 4000 --out /tmp/s   # a quick, worse one
    python -m icl_cli.zoo.smollm2_suite --estimate           # only the time estimate

1. Layers. The task-vector sweep (`icl collect --model smollm2-135m --layers all` on antonyms,
   singular_plural, present_simple_past_simple and location_continent; 8 prompts of 12 shots, 24
   held-out) closes the largest share of the 0-shot -> few-shot nll gap at resid_pre[21] (0.47 on
   average; per task 0.35 at 15, 0.59 at 21, 0.50 at 21, 0.71 at 25), with a jump from 0.19 at
   layer 20. The executor layer is 21; the detector layer is 20, one below it as in the paper
   (Gemma-1 2B: executors at 12, detectors at 11); the circuit window is 19-21.
2. Text: few-shot prompts of all 23 built-in tasks in the three templates (paper, hendel, todd),
   0-24 shots, seeded (the paper trained its SAEs on FineWeb instead, which is not reachable
   offline). The first `eval_tokens` are held out for the metrics.
3. One pass: at every layer of the window, a residual SAE (resid_pre), an attention-output SAE
   (attn_out) and a transcoder (mlp_in -> mlp_out), all TopK (k active features, `width` wide),
   trained together on forward passes that stop after block 21 (train_suite).
4. The metrics of train-sae (L0, FVU, CE loss recovered on the held-out tokens) and the FVU of the
   float16 weights on the check prompts go into manifest.json; the table is printed for the README.

The shipped suite is this script's defaults (200k training tokens, 8192 held out): 17 min on this
2-core machine shared with other jobs (10 min of CPU), the forward passes at 160-380 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "smollm2-suite"
LAYERS = (19, 20, 21)
EXECUTOR, DETECTOR = 21, 20
TEMPLATES = ("paper", "hendel", "todd")


def prompt_texts(seed: int, max_shot: int = 24):
    """Endless few-shot prompts of every built-in task, in a random template and shot count."""
    from icl_cli.core.prompts import Prompt
    from icl_cli.core.tasks import builtin_tasks

    tasks = list(builtin_tasks().values())
    rng = random.Random(seed)
    while True:
        task = rng.choice(tasks)
        n = min(rng.randint(0, max_shot), len(task.pairs) - 1)
        chosen = rng.sample(task.pairs, n + 1)
        yield Prompt(chosen[:-1], chosen[-1], rng.choice(TEMPLATES), True).text


def write_corpus(path: Path, tokenizer, n_tokens: int, seed: int) -> int:
    """Write prompts holding about ``n_tokens`` tokens as JSON lines; returns the token count."""
    total = 0
    with path.open("w", encoding="utf-8") as fh:
        for text in prompt_texts(seed):
            fh.write(json.dumps({"text": text}) + "\n")
            total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if total >= n_tokens:
                return total
    return total


def harvest_rate(lm, ctx: int, rows: int, top: int) -> float:
    """Tokens per second of forward passes stopping after block ``top`` (two timed batches)."""
    import torch

    from icl_cli.core.sites import HookedModel, Site

    hm = HookedModel(lm.model)
    ids = torch.randint(100, 20000, (rows, ctx))
    sites = [Site(k, top) for k in ("resid_pre", "attn_out", "mlp_in", "mlp_out")]
    hm.run(ids, read=sites, stop_after=top)  # warm-up
    t0 = time.perf_counter()
    for _ in range(2):
        hm.run(ids, read=sites, stop_after=top)
    return 2 * rows * ctx / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)), help="circuit window (comma list)")
    ap.add_argument("--tokens", type=int, default=200_000, help="training tokens (every dictionary sees all)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", default=None, help="store the GGUF conversion is cached in (default $ICL_STORE or artifacts)")
    ap.add_argument("--estimate", action="store_true", help="print the time estimate and stop")
    args = ap.parse_args(argv)

    from icl_cli.core import gguf
    from icl_cli.core.threads import configure_threads

    configure_threads(os.environ.get("ICL_THREADS"))
    if args.store:
        gguf.use_store(args.store)
    import tempfile

    from icl_cli.core.models import load_model
    from icl_cli.dictionaries.suite_build import write_suite
    from icl_cli.train_sae.suite import train_suite
    from icl_cli.train_sae.config import TrainConfig

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    layers = [int(x) for x in args.layers.split(",")]
    t_start = time.perf_counter()
    lm = load_model(args.model, device="cpu", dtype="float32")
    say(f"loaded {args.model} ({lm.n_layers} layers, d_model {lm.d_model}) in {time.perf_counter() - t_start:.0f} s")
    rows = max(1, min(64, args.batch_tokens // args.ctx))
    rate = harvest_rate(lm, args.ctx, rows, max(layers))
    harvest = (args.tokens + args.eval_tokens) / rate
    # evaluation: a clean pass to the last block, then per dictionary two passes from its layer
    n_dicts = 3 * len(layers)
    depth = lambda top: (top + 1) / lm.n_layers  # noqa: E731
    evaluation = args.eval_tokens / rate / depth(max(layers)) * (1 + 2 * sum(1 - l / lm.n_layers for l in layers) * 3)
    say(f"estimate: {args.tokens + args.eval_tokens} tokens through blocks 0-{max(layers)} at {rate:.0f} tokens/s "
        f"= {harvest / 60:.1f} min, evaluation ~{evaluation / 60:.1f} min, plus the training of {n_dicts} "
        f"dictionaries (width {args.width}, k {args.k})")
    if args.estimate:
        return 0

    cfg = TrainConfig(model=args.model, layers=layers, site="resid", arch="topk", width=args.width, k=args.k,
                      lr=args.lr, tokens=args.tokens, batch_tokens=args.batch_tokens, ctx=args.ctx,
                      eval_tokens=args.eval_tokens, buffer_batches=16, seed=args.seed, checkpoint_every=0)
    last = [0.0]

    def progress(p: dict) -> None:
        now = time.perf_counter()
        if now - last[0] >= 30 or p["step"] == p["total_steps"]:
            last[0] = now
            say(f"step {p['step']}/{p['total_steps']}  {p['tokens']} tokens  {p['tokens_per_s']:.0f} tokens/s  "
                f"mean L0 {p['l0']:.1f}  mean FVU {p['fvu']:.3f}  ({now - t_start:.0f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "icl-prompts.jsonl"
        # the held-out chunks come first in the file; 10% more text than needed (chunk ends are cut)
        n = write_corpus(corpus, lm.tokenizer, int(1.1 * (args.tokens + args.eval_tokens)) + 4 * args.ctx, args.seed)
        say(f"wrote {n} tokens of few-shot prompts ({', '.join(TEMPLATES)} templates, 0-24 shots, all tasks)")
        cfg.dataset = str(corpus)
        t_train = time.perf_counter()
        members = train_suite(lm, cfg, progress=progress)
        train_s = time.perf_counter() - t_train
    training = {"arch": "topk", "k": args.k, "width": args.width, "tokens": args.tokens, "batch_tokens": args.batch_tokens,
                "ctx": args.ctx, "lr": args.lr, "eval_tokens": args.eval_tokens, "seed": args.seed,
                "dataset": "few-shot prompts of the 23 built-in tasks, templates paper/hendel/todd, 0-24 shots "
                           f"(seed {args.seed}; the first eval_tokens held out)",
                "executor_layer": EXECUTOR, "detector_layer": DETECTOR, "window": layers,
                "script": "python -m icl_cli.zoo.smollm2_suite", "train_seconds": round(train_s, 1),
                "harvest_tokens_per_s": round(rate, 1)}
    m = write_suite(args.out, members, lm, name="smollm2-suite", training=training)
    say(f"trained and wrote {len(members)} dictionaries to {args.out} in {(time.perf_counter() - t_start) / 60:.1f} min "
        f"(training and evaluation {train_s / 60:.1f} min)")
    print(table(m))
    return 0


def table(manifest: dict) -> str:
    """The README's table of a suite manifest."""
    names = {"resid": "residual (`resid_pre`)", "attn": "attention output (`attn_out`)",
             "transcoder": "transcoder (`mlp_in → mlp_out`)"}
    lines = ["| dictionary | layer | L0 | FVU | FVU (fp16, check prompts) | dead | CE recovered |",
             "|---|---|---|---|---|---|---|"]
    for kind in ("resid", "attn", "transcoder"):
        for e in (x for x in manifest["dictionaries"] if x["kind"] == kind):
            lines.append(f"| {names[kind]} | {e['layer']} | {e['l0']:.1f} | {e['fvu']:.3f} | {e['check_fvu']:.3f} | "
                         f"{e['dead_fraction']:.3f} | {e['ce_recovered']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
