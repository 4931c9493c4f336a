"""Max-activating examples (SPEC §8): for chosen features, the top contexts of a corpus.

1. Stream token chunks from the corpus (the toy model's task prompts, local .txt/.jsonl files or
   an HF dataset), run the model up to the SAE's layer (early exit) and encode the site.
2. Keep, per feature, the ``n_top`` (chunk, position) pairs with the largest activation; two hits
   of one feature in one chunk both count (they are different tokens).
3. Store each hit's activation, position and the chunk's token ids, so the firing token can be
   shown in its context.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from icl_cli.collect.vectors import sae_site
from icl_cli.core.sites import HookedModel
from icl_cli.core.errors import IclError
from icl_cli.train_sae.data import pad_batch, text_stream, token_chunks, token_mask

FORMAT_VERSION = 1


@dataclass
class TopParams:
    features: tuple[int, ...]
    """Feature ids to look up."""
    dataset: str = "tasks"
    """`tasks` (the toy corpus), local .txt/.jsonl files, or an HF dataset name."""
    n_tokens: int = 20000
    """Tokens to scan."""
    ctx: int = 64
    """Chunk length in tokens."""
    n_top: int = 10
    """Contexts kept per feature."""
    seed: int = 0
    """Seed of the toy corpus."""


@dataclass
class TopResult:
    values: torch.Tensor  # [F, n_top] activation (−inf where fewer hits)
    positions: torch.Tensor  # [F, n_top] firing token index in its chunk
    chunks: torch.Tensor  # [F, n_top, ctx] token ids (pad −1)


@torch.no_grad()
def top_activations(lm, sae, p: TopParams, batch_size: int = 16, progress: Callable[[int], None] | None = None) -> TopResult:
    hm = HookedModel(lm.model)
    site = sae_site(sae, hm.n_layers)
    n_feat = sae.cfg.d_sae
    bad = [f for f in p.features if not 0 <= f < n_feat]
    if bad:
        raise IclError(f"feature(s) {bad} out of range: the SAE has features 0-{n_feat - 1}")
    feats = torch.tensor(p.features, dtype=torch.long)
    F, K = len(feats), p.n_top
    best_v = torch.full((F, K), float("-inf"))
    best_pos = torch.zeros((F, K), dtype=torch.long)
    best_chunk = torch.full((F, K, p.ctx), -1, dtype=torch.long)
    chunks = token_chunks(text_stream(p.dataset, p.seed), lm.tokenizer, p.ctx)
    seen = 0
    pad = lm.tokenizer.pad_token_id or 0
    while seen < p.n_tokens:
        batch = list(itertools.islice(chunks, batch_size))
        if not batch:
            break
        ids, mask = pad_batch(batch, pad)
        out = hm.run(ids.to(lm.device), mask.to(lm.device), read=[site], stop_after=site.layer)
        acts = sae.encode(out.acts[site].to(sae.W_enc.device))[..., feats.to(sae.W_enc.device)].float().cpu()  # [B, P, F]
        valid = token_mask(mask, lm.tokenizer.bos_token_id is not None)
        acts = acts.masked_fill(~valid[..., None], float("-inf"))
        B, P = ids.shape
        flat = acts.permute(2, 0, 1).reshape(F, B * P)  # [F, B*P]
        k = min(K, B * P)
        v, idx = flat.topk(k, dim=1)
        # merge the batch's candidates with the kept ones
        cand_chunk = torch.full((F, k, p.ctx), -1, dtype=torch.long)
        rows = ids.masked_fill(mask == 0, -1)
        cand_chunk[..., :P] = rows[idx // P][..., : p.ctx]
        all_v = torch.cat([best_v, v], 1)
        all_pos = torch.cat([best_pos, idx % P], 1)
        all_chunk = torch.cat([best_chunk, cand_chunk], 1)
        keep = all_v.topk(K, dim=1).indices
        best_v = all_v.gather(1, keep)
        best_pos = all_pos.gather(1, keep)
        best_chunk = all_chunk.gather(1, keep[..., None].expand(-1, -1, p.ctx))
        seen += int(valid.sum())
        if progress:
            progress(seen)
    if seen == 0:
        raise IclError(f"dataset {p.dataset!r} yielded no tokens")
    return TopResult(best_v, best_pos, best_chunk)


def write_h5(f, p: TopParams, r: TopResult) -> None:
    f.create_dataset("features", data=list(p.features))
    f.create_dataset("values", data=r.values.numpy())
    f.create_dataset("positions", data=r.positions.numpy())
    f.create_dataset("chunks", data=r.chunks.numpy())


def read_h5(path) -> tuple[list[int], TopResult]:
    import h5py

    with h5py.File(path, "r") as f:
        feats = [int(x) for x in f["features"][()]]
        return feats, TopResult(*(torch.from_numpy(f[k][()]) for k in ("values", "positions", "chunks")))


def contexts(tokenizer, feats: Sequence[int], r: TopResult, window: int = 12) -> dict[int, list[dict]]:
    """feature -> [{value, tokens (the window), fire (its index in tokens)}], best first."""
    out: dict[int, list[dict]] = {}
    for i, f in enumerate(feats):
        rows = []
        for j in range(r.values.shape[1]):
            v = float(r.values[i, j])
            if v == float("-inf"):
                continue
            ids = [t for t in r.chunks[i, j].tolist() if t >= 0]
            pos = int(r.positions[i, j])
            lo = max(0, pos - window)
            # each token as text (byte-level BPE pieces such as 'Ġ', 'Ċ' or 'Ã©' become ' ', a newline, 'é')
            toks = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(ids[lo : pos + 4])]
            rows.append({"value": v, "tokens": toks, "fire": pos - lo})
        out[f] = rows
    return out
