"""Forward passes with a vector added or written at the query's arrow, and their metrics.

Shared by ``collect`` (layer sweeps), ``clean`` (held-out losses of each method) and ``steer``.
The residual below the steered layer does not depend on the vector, so it is computed once per
batch (``BaseCache``) and every steered pass runs only the blocks from that layer on.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def steered_logits(hm: HookedModel, cache: BaseCache, layer: int, vector: Tensor | None, mode: str = "add",
                   grad: bool = False, scale: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Logits with ``vector`` ([D] or [B,D]) added to / written into resid_pre[layer] at ``mask``
    ([B,P] bool; default: the query's arrow)."""
    b = cache.batch
    edit = {}
    if vector is not None:
        mask = b.zero_shot_arrow_mask() if mask is None else mask
        fn = add_at(vector, mask, scale) if mode == "add" else replace_at(vector, mask)
        edit = {Site("resid_pre", layer): fn}
    out = hm.run(b.input_ids, b.attention_mask, edit=edit, start_at=layer, start_resid=cache.resid[layer], grad=grad)
    return out.logits


def scores(logits: Tensor, batch: PromptBatch) -> Scores:
    return Scores(nll_per_prompt(logits, batch).mean().item(), correct(logits, batch).float().mean().item())


@torch.no_grad()
def plain_scores(hm: HookedModel, tokenizer, prompts: Sequence[Prompt], n_first: int = 2, device=None) -> Scores:
    batch = encode_prompts(tokenizer, prompts, n_first=n_first, device=device)
    return scores(hm.run(batch.input_ids, batch.attention_mask).logits, batch)


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
