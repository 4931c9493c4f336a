"""The batched layer sweep (core/steering.sweep_scores) against the straightforward computation:
for each layer and mode, a full forward pass of the plain HF model with a pre-hook (written here)
that adds / writes the vector at the query's arrow, scored by hand."""

from __future__ import annotations

import pytest
import torch

from icl_cli.core.batch import PromptBatch
from icl_cli.core.sites import HookedModel
from icl_cli.core.steering import BaseCache, sweep_scores
from tests.core.tiny_models import VOCAB, tiny_model

B, P, N_LAYERS = 5, 9, 4


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _batch() -> PromptBatch:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 7, 9, 5, 8])  # right padded
    mask = (torch.arange(P)[None] < lengths[:, None]).long()
    ids = torch.randint(3, VOCAB, (B, P), generator=g) * mask
    arrow = lengths - 3  # the query's arrow; the answer's two tokens follow it
    answer_pos = torch.stack([arrow, arrow + 1], 1)
    answer_pos[1, 1] = -1  # a one-token answer
    answer_ids = torch.gather(ids, 1, (answer_pos + 1).clamp(min=0)) * (answer_pos >= 0)
    return PromptBatch(ids, mask, torch.zeros(B, P, dtype=torch.int8), arrow, answer_pos, answer_ids,
                       answer_pos[:, :1], answer_ids[:, :1])


def _by_hand(model, b: PromptBatch, layer: int, vector: torch.Tensor, mode: str) -> tuple[float, float]:
    rows = torch.arange(B)

    def steer(module, args, kwargs):
        x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
        x[rows, b.query_arrow] = x[rows, b.query_arrow] + vector if mode == "add" else vector.expand(B, -1)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": x}
        return (x, *args[1:]), kwargs

    h = _blocks(model)[layer].register_forward_pre_hook(steer, with_kwargs=True)
    try:
        with torch.no_grad():
            logp = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.log_softmax(-1)
    finally:
        h.remove()
    nll = torch.zeros(B)
    for i in range(B):
        for k in range(b.answer_pos.shape[1]):
            if b.answer_pos[i, k] >= 0:
                nll[i] -= logp[i, b.answer_pos[i, k], b.answer_ids[i, k]]
    acc = (logp[rows, b.answer_pos[:, 0]].argmax(-1) == b.answer_ids[:, 0]).float().mean()
    return float(nll.mean()), float(acc)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "llama", "gpt2"])
def test_sweep_equals_one_full_steered_pass_per_layer(family):
    model = tiny_model(family, n_layers=N_LAYERS)
    hm = HookedModel(model)
    b = _batch()
    layers = [0, 1, 3]  # a gap: layer 2 is not swept, its block must still run for rows from 0 and 1
    with torch.no_grad():
        resid = hm.run(b.input_ids, b.attention_mask, read=[f"resid_pre.{l}" for l in layers], stop_after=3).acts
    cache = BaseCache(b, {l: resid[f"resid_pre.{l}"] for l in layers})
    vectors = torch.randn(len(layers), hm.d_model, generator=torch.Generator().manual_seed(1)) * 3
    want = {m: [_by_hand(model, b, l, vectors[j], m) for j, l in enumerate(layers)] for m in ("add", "replace")}
    # the answers must depend on the layer and mode, or the comparison below proves little
    assert len({round(x[0], 4) for m in want for x in want[m]}) == 2 * len(layers)
    for max_rows in (None, B, 2 * B, 3 * B):  # one pass; one job a pass; passes split inside a layer
        got = sweep_scores(hm, cache, layers, vectors, ("add", "replace"), max_rows=max_rows)
        for m in want:
            for (nll, acc), s in zip(want[m], got[m]):
                assert s.nll == pytest.approx(nll, abs=1e-4), (max_rows, m)
                assert s.acc == acc, (max_rows, m)
