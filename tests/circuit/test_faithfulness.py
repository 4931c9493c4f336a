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


def m_keeping(hm, batch, dicts, keep: dict, fill: dict | None = None) -> float:
    """m with every feature at a role token set to 0 (or to fill[key][group, feature]) except
    keep[key] [G,F] bool (written here)."""
    idx = role_index(batch)
    box = {}

    def site(key):
        d = dicts[key]

        def write(x_in, x_out):
            a = d.encode(x_in)
            e = x_out - d.decode(a)
            kept = torch.zeros_like(a, dtype=torch.bool)
            new = torch.zeros_like(a)
            for g in range(5):
                kept |= (idx == g)[..., None] & keep[key][g]
                if fill is not None:
                    new = torch.where((idx == g)[..., None], fill[key][g].to(a.dtype), new)
            off = (idx < 0)[..., None]
            return d.decode(torch.where(kept | off, a, new)) + e
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


def test_select_finds_the_smallest_set_on_a_known_curve(monkeypatch):
    """select's search (grid, then bisection) against a brute-force scan of a known F(n): the
    metric is replaced by a function of how many top nodes a mask keeps."""
    import math
    from types import SimpleNamespace

    import icl_cli.circuit.faithfulness as fm

    torch.manual_seed(0)
    r = Ranking.of({("resid", 0): torch.randn(3, 20) + 0.01})  # 60 nodes, none zero
    N = len(r)

    def metric(n: int) -> float:  # rises steeply, then slowly: F(n) = (m(n) − m(0)) / (m(N) − m(0))
        return -3.0 + 2.0 * (1 - math.exp(-n / 6.0)) + 0.01 * n

    def fake_ablated(hm, batch, dicts, groups, base, ablate):
        kept = N - sum(int(m.sum()) for m in ablate.values())  # keep=True masks ablate all but the top n
        return metric(kept)

    monkeypatch.setattr(fm, "ablated_metric", fake_ablated)
    groups = SimpleNamespace(index=torch.zeros(1))
    F = [(metric(n) - metric(0)) / (metric(N) - metric(0)) for n in range(N + 1)]
    for target in (0.5, 0.8, 0.95, 0.99):
        want = next(n for n in range(N + 1) if F[n] >= target)
        sel = fm.select(None, None, None, groups, None, r, target=target, points=6, bisect_steps=8)
        assert sel.n == want, target
        assert sel.faithfulness == pytest.approx(F[want]) and sel.threshold == pytest.approx(float(r.ie[want - 1].abs()))
        assert all(f == pytest.approx(F[n]) for n, f in zip(sel.sweep_n, sel.sweep_faithfulness))


def test_grid_and_threshold_by_hand():
    from icl_cli.circuit.faithfulness import grid

    assert grid(0) == [0] and grid(1) == [0, 1]
    assert grid(100, 5) == [0, 1, 3, 10, 32, 100]  # 10^(0, 0.5, 1, 1.5, 2), rounded
    r = Ranking.of({("resid", 0): torch.tensor([[0.5, -2.0, 1.0]])})
    assert r.threshold(0) == float("inf")
    assert [r.threshold(n) for n in (1, 2, 3, 9)] == [2.0, 1.0, 0.5, 0.5]


def test_mean_ablation_writes_each_groups_mean_activation(setup):
    """With the mean baseline, an ablated node takes its group's mean activation (written here
    as a hook), not 0; F's reference points follow."""
    hm, dicts, batch, _ = setup
    s = node_scores(hm, batch, dicts, "atp", "mean")
    r = Ranking.of(s.ie)
    n = 40
    keep = {k: torch.zeros(5, 24, dtype=torch.bool) for k in dicts}
    for i in range(n):
        keep[r.keys[int(r.key_idx[i])]][int(r.group[i]), int(r.feature[i])] = True
    got = ablated_metric(hm, batch, dicts, s.groups, s.base, r.mask(n, keep=True))
    want = m_keeping(hm, batch, dicts, keep, fill=s.base.a)
    assert got == pytest.approx(want, abs=1e-4)
    assert got != pytest.approx(m_keeping(hm, batch, dicts, keep), abs=1e-3)  # zero-filling differs


def test_reference_refuses_a_metric_that_ablation_does_not_move(monkeypatch):
    from types import SimpleNamespace

    import icl_cli.circuit.faithfulness as fm
    from icl_cli.core.errors import IclError

    r = Ranking.of({("resid", 0): torch.tensor([[1.0, -0.5]])})
    groups = SimpleNamespace(index=torch.zeros(1))
    monkeypatch.setattr(fm, "ablated_metric", lambda *a: -2.0)  # m(full) = m(empty) = −2
    with pytest.raises(IclError, match="faithfulness is undefined"):
        fm.reference(None, None, None, groups, None, r)
    vals = iter([-2.0, -3.0])
    monkeypatch.setattr(fm, "ablated_metric", lambda *a: next(vals))
    f = fm.reference(None, None, None, groups, None, r)
    assert (f.m_full, f.m_empty) == (-2.0, -3.0) and f(-2.5) == pytest.approx(0.5)
