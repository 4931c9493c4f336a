"""Cost of reading every site of every layer, relative to a plain pass (target ratio <= 1.10).

    python benchmarks/hook_overhead.py
    python benchmarks/hook_overhead.py --d-model 512 --layers 6 --repeats 40

Both sides run forward + backward on the same random Gemma model (frozen weights, as in
attribution patching) with the same loss:
- plain:  ``model(inputs_embeds=e)`` with ``e`` requiring grad, so the backward runs through
  every block;
- hooked: ``HookedModel.run(ids, read=<all 6 sites x all layers>, grad=True)``; its first read
  becomes the leaf, so the backward covers the same blocks and fills every site's gradient.
Runs are interleaved (alternating which goes first) after a warm-up; the ratio of the medians is
printed, measured in this one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers as tr

from icl_cli.core.sites import HookedModel


def build(d_model: int, layers: int, vocab: int) -> torch.nn.Module:
    config = tr.GemmaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, head_dim=d_model // 4, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(config).eval()
    model.requires_grad_(False)
    return model


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args.d_model, args.layers, args.vocab)
    hm = HookedModel(model)
    sites = hm.sites()
    ids = torch.randint(args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    embed = model.get_input_embeddings()

    def plain() -> None:
        e = embed(ids).requires_grad_()
        loss_of(model(inputs_embeds=e, use_cache=False).logits, ids).backward()

    def hooked() -> None:
        out = hm.run(ids, read=sites, grad=True)
        loss_of(out.logits, ids).backward()

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for _ in range(args.warmup):
        plain(), hooked()
    times: dict[str, list[float]] = {"plain": [], "hooked": []}
    for i in range(args.repeats):
        order = ("plain", "hooked") if i % 2 == 0 else ("hooked", "plain")  # cancel drift
        for name in order:
            times[name].append(timed(plain if name == "plain" else hooked))
    p, h = statistics.median(times["plain"]), statistics.median(times["hooked"])
    print(f"model: gemma d_model={args.d_model} layers={args.layers} batch={args.batch}x{args.seq}, "
          f"{len(sites)} sites read, {args.repeats} interleaved repeats, {torch.get_num_threads()} threads")
    print(f"plain  fwd+bwd median: {1e3 * p:8.2f} ms")
    print(f"hooked fwd+bwd median: {1e3 * h:8.2f} ms")
    print(f"ratio hooked/plain: {h / p:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
