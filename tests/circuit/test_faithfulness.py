"""Faithfulness through the real code path: F(M) = 1, F(∅) = 0, m(∅) against ablations written
here, and the selected circuit's F recomputed independently."""

from __future__ import annotations

import pytest
import torch

from icl_cli.circuit.attribution import node_scores
from icl_cli.circuit.faithfulness import Ranking, ablated_metric, reference, select
from icl_cli.core.sites import HookedModel, Site
from tests.circuit.helpers import role_index, tiny_suite, toy_batch
from tests.circuit.test_attribution import m64


@pytest.fixture(scope="module")
def setup(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    dicts = tiny_suite(tiny_lm.d_model, range(tiny_lm.n_layers), d_sae=24, seed=5)
    batch = toy_batch(tiny_lm, n_prompts=3, n_shot=4)
    s = node_scores(hm, batch, dicts, "atp", "zero")
    return hm, dicts, batch, s


def m_keeping(hm, batch, dicts, keep: dict) -> float:
    """m with every feature at a role token set to 0 except keep[key] [G,F] bool (written here)."""
    idx = role_index(batch)
    box = {}

    def site(key):
        d = dicts[key]

        def write(x_in, x_out):
            a = d.encode(x_in)
            e = x_out - d.decode(a)
            kept = torch.zeros_like(a, dtype=torch.bool)
            for g in range(5):
                kept |= (idx == g)[..., None] & keep[key][g]
            off = (idx < 0)[..., None]
            return d.decode(torch.where(kept | off, a, torch.zeros_like(a))) + e
        return write

    edit = {}
    for (kind, l) in dicts:
        w = site((kind, l))
        if kind == "resid":
            edit[Site("resid_pre", l)] = lambda x, w=w: w(x, x)
        elif kind == "attn":
            edit[Site("attn_out", l)] = lambda x, w=w: w(x, x)
        else:
            edit[Site("mlp_in", l)] = lambda x, l=l: _stash(box, l, x)
            edit[Site("mlp_out", l)] = lambda y, w=w, l=l: w(box[l], y)
    return float(m64(hm.run(batch.input_ids, batch.attention_mask, edit=edit).logits, batch))


def _stash(box: dict, l: int, x):
    box[l] = x
    return x


def test_full_set_is_one_and_empty_set_is_zero(setup):
    hm, dicts, batch, s = setup
    r = Ranking.of(s.ie)
    faith = reference(hm, batch, dicts, s.groups, s.base, r)
    m_full = ablated_metric(hm, batch, dicts, s.groups, s.base, r.mask(len(r), keep=True))
    m_empty = ablated_metric(hm, batch, dicts, s.groups, s.base, r.mask(0, keep=True))
    assert faith(m_full) == pytest.approx(1.0, abs=1e-12)
    assert faith(m_empty) == pytest.approx(0.0, abs=1e-12)
    # the reference points themselves, computed independently
    assert m_full == pytest.approx(float(m64(hm.run(batch.input_ids, batch.attention_mask).logits, batch)), abs=1e-5)
    none = {k: torch.zeros(5, 24, dtype=torch.bool) for k in dicts}
    assert m_empty == pytest.approx(m_keeping(hm, batch, dicts, none), abs=1e-4)
    assert abs(m_full - m_empty) > 1e-3


def test_selected_circuit_reaches_the_target(setup):
    hm, dicts, batch, s = setup
    r = Ranking.of(s.ie)
    sel = select(hm, batch, dicts, s.groups, s.base, r, target=0.95)
    assert sel.faithfulness >= 0.95
    assert 0 < sel.n <= len(r)
    assert list(sel.sweep_n) == sorted(sel.sweep_n) and sel.sweep_faithfulness[0] == pytest.approx(0.0, abs=1e-12)
    # recompute F of the selected set with the ablation written in this test
    keep = {k: torch.zeros(5, 24, dtype=torch.bool) for k in dicts}
    for i in range(sel.n):
        keep[r.keys[int(r.key_idx[i])]][int(r.group[i]), int(r.feature[i])] = True
    m_c = m_keeping(hm, batch, dicts, keep)
    F = (m_c - sel.faith.m_empty) / (sel.faith.m_full - sel.faith.m_empty)
    assert F == pytest.approx(sel.faithfulness, abs=1e-3)
    # the threshold is the |IE| of the last kept node, and every kept node is at least that large
    assert sel.threshold == pytest.approx(float(r.ie[sel.n - 1].abs()))
    assert float(r.ie[: sel.n].abs().min()) >= sel.threshold
