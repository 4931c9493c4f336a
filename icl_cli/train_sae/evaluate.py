"""Held-out metrics of trained dictionaries (SPEC §9).

For each dictionary, on tokens it never trained on (BOS and padding excluded):
- L0: mean number of active features per token;
- FVU: Σ‖t − t̂‖² / Σ‖t − mean(t)‖² (fraction of variance unexplained);
- CE loss recovered: (CE_zero − CE_spliced) / (CE_zero − CE_clean), where CE_spliced runs the
  model with the site replaced by the reconstruction (a transcoder replaces mlp_out with
  transcoder(mlp_in)) and CE_zero with the site set to zero, at the same positions. CE is over
  every next token of a text corpus, and over the answer tokens of the toy model's task prompts
  (the only tokens it is trained to predict).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from icl_cli.core.memory import CE_CHUNK  # positions unembedded at once for the cross-entropy (~1 GiB at 256k)
from icl_cli.core.sites import Site
from icl_cli.core.steering import unembed
from icl_cli.train_sae.data import pad_batch, token_mask


def _ce(hm, resid: Tensor, ids: Tensor, mask: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over the targets in ``mask`` ([B, P], 1 = score the
    prediction of this token), and their count, from the last block's output ``resid`` [B, P, D]:
    only the predicting positions are unembedded, ``CE_CHUNK`` at a time."""
    rows, pos = mask[:, 1:].bool().nonzero(as_tuple=True)  # position p predicts token p + 1
    total = 0.0
    for i in range(0, len(rows), CE_CHUNK):
        r, p = rows[i : i + CE_CHUNK], pos[i : i + CE_CHUNK]
        logits = unembed(hm, resid[r, p]).float()  # [c, V]
        total += float(F.cross_entropy(logits, ids[r, p + 1], reduction="sum"))
    return total, len(rows)


@torch.no_grad()
def evaluate(hm, tokenizer, dicts: Sequence, reads: Sequence[tuple], chunks: list[list[int]], device, rows: int = 16,
             targets: list[list[bool]] | None = None) -> list[dict]:
    """One metrics dict per dictionary: l0, fvu, ce_clean, ce_spliced, ce_zero, ce_recovered.

    targets: per chunk and token, whether CE scores the prediction of that token (default: every
    real token). The toy model is scored on answer tokens, the only ones it was trained on.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    has_bos = tokenizer.bos_token_id is not None
    n = len(dicts)
    l0 = [0.0] * n
    sse = [0.0] * n
    tokens = 0
    sums = [None] * n  # Σt, Σ‖t‖² for the variance
    sq = [0.0] * n
    ce = {"clean": 0.0, **{f"{k}{i}": 0.0 for i in range(n) for k in ("sae", "zero")}}
    n_tgt = 0
    last = Site("resid_post", hm.n_layers - 1)
    for start in range(0, len(chunks), rows):
        ids, mask = pad_batch(chunks[start : start + rows], pad)
        ids, mask = ids.to(device), mask.to(device)
        scored = mask
        if targets is not None:
            scored = torch.zeros_like(mask)
            for b, t in enumerate(targets[start : start + rows]):
                scored[b, : len(t)] = torch.tensor(t, dtype=mask.dtype)
        keep = token_mask(mask, has_bos)
        sites = {s for pair in reads for s in pair if s is not None}
        starts = {Site("resid_pre", s_in.layer) for s_in, _ in reads}  # spliced runs start there
        out = hm.run(ids, mask, read=sites | starts | {last}, stop_after=last.layer)
        c, cnt = _ce(hm, out.acts[last], ids, scored)
        ce["clean"] += c
        n_tgt += cnt
        tokens += int(keep.sum())
        for i, (d, (s_in, s_out)) in enumerate(zip(dicts, reads)):
            x = out.acts[s_in][keep].float()
            t = out.acts[s_out][keep].float() if s_out is not None else x
            a = d.encode(x)
            t_hat = d.decode(a)
            l0[i] += float((a > 0).sum())
            sse[i] += float((t - t_hat).pow(2).sum())
            sums[i] = t.sum(0) if sums[i] is None else sums[i] + t.sum(0)
            sq[i] += float(t.pow(2).sum())
            for kind in ("sae", "zero"):
                edit = _splice(d, s_in, s_out, keep, zero=kind == "zero")
                start = Site("resid_pre", s_in.layer)  # the blocks below the dictionary are the clean run's
                spliced = hm.run(ids, mask, read=[last], edit=edit, stop_after=last.layer, start_at=start.layer,
                                 start_resid=out.acts[start]).acts[last]
                ce[f"{kind}{i}"] += _ce(hm, spliced, ids, scored)[0]
    results = []
    for i in range(n):
        var = sq[i] - float(sums[i].pow(2).sum()) / max(tokens, 1)
        clean, sae, zero = ce["clean"] / n_tgt, ce[f"sae{i}"] / n_tgt, ce[f"zero{i}"] / n_tgt
        denom = zero - clean
        results.append({
            "l0": l0[i] / max(tokens, 1),
            "fvu": sse[i] / max(var, 1e-12),
            "ce_clean": clean,
            "ce_spliced": sae,
            "ce_zero": zero,
            "ce_recovered": (zero - sae) / denom if abs(denom) > 1e-9 else float("nan"),
            "eval_tokens": tokens,
        })
    return results


def _splice(d, s_in, s_out, keep: Tensor, zero: bool) -> dict:
    """Edits that put the reconstruction (or zero) at the dictionary's output site."""
    m = keep[..., None]
    if s_out is None:  # an SAE: replace the site with its reconstruction
        def fn(x: Tensor) -> Tensor:
            new = torch.zeros_like(x) if zero else d(x.float()).to(x.dtype)
            return torch.where(m, new, x)

        return {s_in: fn}
    stash: dict[str, Tensor] = {}

    def grab(x: Tensor) -> Tensor:
        stash["in"] = x
        return x

    def put(y: Tensor) -> Tensor:
        new = torch.zeros_like(y) if zero else d(stash["in"].float()).to(y.dtype)
        return torch.where(m, new, y)

    return {s_in: grab, s_out: put}
