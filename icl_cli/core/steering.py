"""Forward passes with a vector added or written at the query's arrow, and their metrics.

Shared by ``collect`` (layer sweeps), ``clean`` (held-out losses of each method) and ``steer``.
The residual below the steered layer does not depend on the vector, so it is computed once per
batch (``BaseCache``) and every steered pass runs only the blocks from that layer on.

A layer sweep (``sweep_scores``: one vector per layer, each steered alone) batches those partial
passes over layers: one pass starts at the lowest swept layer with that layer's steered rows, and
at the input of each later swept block l the rows steered at l join the batch. Each row still
runs exactly blocks l … n−1, so the sweep costs Σ_l (n − l)/n plain passes, in a few large passes
instead of one small pass per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from icl_cli.core.batch import PromptBatch, encode_prompts
from icl_cli.core.metrics import correct, nll_per_prompt
from icl_cli.core.prompts import Prompt
from icl_cli.core.sites import HookedModel, Site, add_at, replace_at


class Scores(NamedTuple):
    nll: float
    acc: float


@dataclass
class BaseCache:
    """One batch of prompts with resid_pre at every layer of interest, computed once."""

    batch: PromptBatch
    resid: dict[int, Tensor]  # layer -> resid_pre[layer] [B, P, D]

    @classmethod
    def build(cls, hm: HookedModel, tokenizer, prompts: Sequence[Prompt], layers: Sequence[int], n_first: int = 2,
              device=None) -> "BaseCache":
        batch = encode_prompts(tokenizer, prompts, n_first=n_first, device=device)
        sites = [Site("resid_pre", l) for l in sorted(set(layers))]
        out = hm.run(batch.input_ids, batch.attention_mask, read=sites, stop_after=max(layers))
        return cls(batch, {s.layer: out.acts[s] for s in sites})


def _steer_edit(b: PromptBatch, layer: int, vector: Tensor | None, mode: str, scale: float, mask: Tensor | None) -> dict:
    if vector is None:
        return {}
    mask = b.zero_shot_arrow_mask() if mask is None else mask
    fn = add_at(vector, mask, scale) if mode == "add" else replace_at(vector, mask)
    return {Site("resid_pre", layer): fn}


def steered_logits(hm: HookedModel, cache: BaseCache, layer: int, vector: Tensor | None, mode: str = "add",
                   grad: bool = False, scale: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Logits [B,P,V] with ``vector`` ([D] or [B,D]) added to / written into resid_pre[layer] at
    ``mask`` ([B,P] bool; default: the query's arrow)."""
    b = cache.batch
    edit = _steer_edit(b, layer, vector, mode, scale, mask)
    out = hm.run(b.input_ids, b.attention_mask, edit=edit, start_at=layer, start_resid=cache.resid[layer], grad=grad)
    return out.logits


def answer_logits(hm: HookedModel, resid: Tensor, pos: Tensor) -> Tensor:
    """[R, J, V] logits at positions ``pos`` [R, J] (entries < 0 read position 0) from the last
    block's output ``resid`` [R, P, D]: the model's final norm, unembedding and (Gemma-2) final
    soft-capping, applied to those positions only. Both are per-position maps, so this equals the
    full logits at those positions."""
    rows = torch.arange(resid.shape[0], device=resid.device)[:, None]
    return unembed(hm, resid[rows, pos.clamp(min=0).to(resid.device)])


def unembed(hm: HookedModel, h: Tensor) -> Tensor:
    """[..., V] logits of last-block outputs h [..., D]: the model's final norm, unembedding and
    (Gemma-2) final soft-capping, which act on each position alone."""
    logits = hm.model.get_output_embeddings()(hm._loc.final_norm(h))
    cap = getattr(hm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def run_answers(hm: HookedModel, b: PromptBatch, edit: dict | None = None, start_at: int | None = None,
                start_resid: Tensor | None = None, grad: bool = False) -> tuple[Tensor, PromptBatch]:
    """(logits [B, J, V] at the answer positions only, the batch whose ``answer_pos`` index them):
    one pass like ``hm.run`` that stops before the unembedding, which is then applied to the J
    predicting positions per prompt instead of all P. nll / correct of the pair equal those of
    the full logits with ``b``; on small models and large vocabularies the full unembedding
    dominates a pass's time and memory."""
    last = Site("resid_post", hm.n_layers - 1)
    out = hm.run(b.input_ids, b.attention_mask, read=[last], edit=edit, stop_after=last.layer, start_at=start_at,
                 start_resid=start_resid, grad=grad)
    logits = answer_logits(hm, out.acts[last], b.answer_pos)
    at = torch.arange(b.answer_pos.shape[1], device=b.answer_pos.device).expand_as(b.answer_pos)
    return logits, replace(b, answer_pos=torch.where(b.answer_pos >= 0, at, b.answer_pos))


def steered_answers(hm: HookedModel, cache: BaseCache, layer: int, vector: Tensor | None, mode: str = "add",
                    grad: bool = False, scale: float = 1.0, mask: Tensor | None = None) -> tuple[Tensor, PromptBatch]:
    """``steered_logits`` at the answer positions only (see ``run_answers``)."""
    b = cache.batch
    return run_answers(hm, b, _steer_edit(b, layer, vector, mode, scale, mask), layer, cache.resid[layer], grad)


def scores(logits: Tensor, batch: PromptBatch) -> Scores:
    return Scores(nll_per_prompt(logits, batch).mean().item(), correct(logits, batch).float().mean().item())


@torch.no_grad()
def plain_scores(hm: HookedModel, tokenizer, prompts: Sequence[Prompt], n_first: int = 2, device=None) -> Scores:
    batch = encode_prompts(tokenizer, prompts, n_first=n_first, device=device)
    return scores(*run_answers(hm, batch))


@torch.no_grad()
def mean_at_role(hm: HookedModel, tokenizer, prompts: Sequence[Prompt], layers: Sequence[int], roles: Sequence[str],
                 batch_size: int = 32, device=None) -> dict[str, Tensor]:
    """role -> [len(layers), D]: mean resid_pre[l] over every token of that role (float32)."""
    sums = {r: torch.zeros(len(layers), hm.d_model) for r in roles}
    counts = {r: 0 for r in roles}
    sites = [Site("resid_pre", l) for l in layers]
    for i in range(0, len(prompts), batch_size):
        batch = encode_prompts(tokenizer, prompts[i : i + batch_size], device=device)
        out = hm.run(batch.input_ids, batch.attention_mask, read=sites, stop_after=max(layers))
        for r in roles:
            mask = batch.role_mask(r)
            counts[r] += int(mask.sum())
            for j, s in enumerate(sites):
                sums[r][j] += out.acts[s][mask].float().sum(0).cpu()
    return {r: sums[r] / max(counts[r], 1) for r in roles}


SWEEP_BYTES = 1 << 26
"""Activation memory one batched sweep pass may take (rows are split over passes beyond it). On a
30-layer random Gemma of d_model 256 (one CPU thread), passes of 128-512 prompts (up to ~100 MiB)
ran at the same speed and passes of 1024-4096 prompts 1.3-1.6× slower (cache misses)."""


def sweep_scores(hm: HookedModel, cache: BaseCache, layers: Sequence[int], vectors: Tensor,
                 modes: Sequence[str] = ("add",), max_rows: int | None = None) -> dict[str, list[Scores]]:
    """mode -> [Scores of the batch with vectors[j] ([len(layers), D]) added to / written into
    resid_pre[layers[j]] at the query's arrow], for each j: the same numbers as
    ``scores(*steered_answers(hm, cache, layers[j], vectors[j], mode))`` for every (j, mode),
    computed in batched passes of at most ``max_rows`` prompts (default: what SWEEP_BYTES holds).
    """
    b = cache.batch
    B = len(b)
    mask = b.zero_shot_arrow_mask()
    if getattr(hm.model.config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        # flash / flex attention take masks the row-joining hooks cannot repeat: one pass per job
        return {m: [scores(*steered_answers(hm, cache, l, vectors[j], m, mask=mask)) for j, l in enumerate(layers)]
                for m in modes}
    jobs = sorted(((l, j, mode) for j, l in enumerate(layers) for mode in modes), key=lambda x: x[0])
    if max_rows is None:
        max_rows = _rows_that_fit(hm, b.input_ids.shape[1], cache.resid[layers[0]].element_size())
    per_pass = max(1, max_rows // B)
    out: dict[str, list[Scores | None]] = {m: [None] * len(layers) for m in modes}
    pos = torch.arange(b.answer_pos.shape[1]).expand_as(b.answer_pos)
    answers = replace(b, answer_pos=torch.where(b.answer_pos >= 0, pos.to(b.answer_pos.device), b.answer_pos))
    with torch.no_grad():
        for chunk in (jobs[i : i + per_pass] for i in range(0, len(jobs), per_pass)):
            starts = [(l, _steer_edit(b, l, vectors[j], mode, 1.0, mask)[Site("resid_pre", l)]) for l, j, mode in chunk]
            last = _joined_pass(hm, cache, starts)  # [len(chunk) * B, P, D]
            logits = answer_logits(hm, last, b.answer_pos.repeat(len(chunk), 1))  # [len(chunk) * B, J, V]
            for k, (_, j, mode) in enumerate(chunk):
                out[mode][j] = scores(logits[k * B : (k + 1) * B], answers)
    return out


def _rows_that_fit(hm: HookedModel, P: int, elem: int) -> int:
    """Prompts of P tokens whose block activations fit SWEEP_BYTES: per row about the MLP's
    hidden layers (3 × d_mlp), a few copies of the stream (8 × D) and the attention scores."""
    cfg = hm.model.config
    d_mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hm.d_model
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    return max(1, SWEEP_BYTES // (elem * P * (3 * d_mlp + 8 * hm.d_model + 2 * heads * P)))


def _joined_pass(hm: HookedModel, cache: BaseCache, starts: list[tuple[int, Callable]]) -> Tensor:
    """resid_post[n−1] [len(starts) * B, P, D] of the batch's prompts, group k having run blocks
    starts[k][0] … n−1 from ``edit(cache.resid[layer])`` (groups in ascending layer order).

    The pass starts at the first group's layer with every group that starts there; a pre-hook
    on each later starting block appends its groups' rows to the block's input, and one on every
    block from the first join on repeats the per-prompt inputs the model passes to each block
    (attention mask, positions; the B-row tensors of the first call, repeated) to the row count."""
    b = cache.batch
    B = len(b)
    first = starts[0][0]
    g0 = sum(1 for l, _ in starts if l == first)
    joins: dict[int, list] = {}
    for l, fn in starts[g0:]:
        joins.setdefault(l, []).append(fn)
    start_resid = torch.cat([fn(cache.resid[first]) for _, fn in starts[:g0]])
    rows0 = g0 * B

    def join(l: int):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if l in joins:
                x = torch.cat([x, *(fn(cache.resid[l].to(x.device, x.dtype)) for fn in joins[l])])
            rows = x.shape[0]
            kwargs = {k: _repeat_rows(v, rows0, B, rows) for k, v in kwargs.items()}
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = x
                return args, kwargs
            return (x, *(_repeat_rows(a, rows0, B, rows) for a in args[1:])), kwargs

        return hook

    handles = [hm._loc.blocks[l].block.register_forward_pre_hook(join(l), with_kwargs=True)
               for l in range(min(joins, default=hm.n_layers), hm.n_layers)]
    last = Site("resid_post", hm.n_layers - 1)
    try:
        out = hm.run(b.input_ids.repeat(g0, 1), b.attention_mask.repeat(g0, 1), read=[last], start_at=first,
                     start_resid=start_resid, stop_after=last.layer)
    finally:
        for h in handles:
            h.remove()
    return out.acts[last]


def _repeat_rows(v, rows0: int, B: int, rows: int):
    """A per-row input of the first call (leading dim rows0 = a repeat of B prompts) repeated to
    ``rows``; anything else (shared tensors with leading dim 1, non-tensors) unchanged. Tuples
    (rotary cos/sin) element-wise."""
    if isinstance(v, tuple):
        return tuple(_repeat_rows(t, rows0, B, rows) for t in v)
    if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[0] == rows0 and rows0 > 1:
        return v[:B].repeat(rows // B, *([1] * (v.dim() - 1)))
    return v
