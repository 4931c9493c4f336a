"""Forward passes with a vector added or written at the query's arrow, and their metrics.

Shared by ``collect`` (layer sweeps), ``clean`` (held-out losses of each method) and ``steer``.
The residual below the steered layer does not depend on the vector, so it is computed once per
batch (``BaseCache``) and every steered pass runs only the blocks from that layer on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

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
