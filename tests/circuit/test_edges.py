"""Edges: batched seeds equal one backward per node, and every edge equals the derivative of its
downstream node's weighted activation under a scaled ablation of its upstream node, measured by
finite differences with the intermediate sites frozen (written here, no autograd)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from icl_cli.circuit.attribution import node_scores
from icl_cli.circuit.edges import edges
from icl_cli.core.sites import HookedModel, Site
from tests.circuit.helpers import role_index, tiny_suite, tiny_toy64, toy_batch

ORDER = ("resid", "attn", "transcoder")
WRITES = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "mlp_out"}


@pytest.fixture(scope="module")
def setup(tiny_toy_dir):
    lm = tiny_toy64(tiny_toy_dir)
    hm = HookedModel(lm.model)
    dicts = tiny_suite(lm.d_model, range(lm.n_layers), d_sae=16, dtype=torch.float64, seed=7)
    batch = toy_batch(lm, n_prompts=2, n_shot=3)
    s = node_scores(hm, batch, dicts, "atp", "mean")
    sel = {}
    for k in s.keys:  # the 5 largest feature nodes of each site and two error nodes
        flat = [(abs(float(s.ie[k][g, f])), g, f) for g, f in torch.nonzero(s.ie[k]).tolist()]
        sel[k] = [(g, f) for _, g, f in sorted(flat, reverse=True)[:5]] + [(2, -1), (3, -1)]
    return hm, dicts, batch, s, sel


def test_batched_edges_equal_one_backward_per_node(setup):
    hm, dicts, batch, s, sel = setup
    batched = edges(hm, batch, dicts, s, sel, max_rows=64)
    single = edges(hm, batch, dicts, s, sel, per_node=True)
    assert len(batched) == len(single) > 100
    one = {(e.src, e.dst): e.weight for e in single}
    w = np.array([e.weight for e in batched])
    diff = np.array([e.weight - one[(e.src, e.dst)] for e in batched])
    assert np.abs(w).max() > 1e-4
    assert np.abs(diff).max() < 1e-5 * max(1.0, np.abs(w).max())
    # every consecutive pair of sites is present
    pairs = {(e.src[0][0], e.dst[0][0], e.dst[0][1] - e.src[0][1]) for e in batched}
    assert {("resid", "attn", 0), ("resid", "transcoder", 0), ("attn", "transcoder", 0), ("resid", "resid", 1),
            ("attn", "resid", 1), ("transcoder", "resid", 1)} <= pairs


def downstream_value(hm, batch, dicts, s, src, dst, t: float) -> float:
    """Σ_{p∈g_d} ∂m/∂a_d[p]·a_d[p] (or ⟨∂m/∂e_d, e_d⟩) with the upstream node moved to a + t(a − a′)
    at its group's tokens and every site between the two held at its clean output."""
    (ku, gu, fu), (kd, gd, fd) = src, dst
    idx = role_index(batch)
    rank = lambda k: (k[1], ORDER.index(k[0]))  # noqa: E731
    clean = hm.run(batch.input_ids, batch.attention_mask,
                   read=[Site(WRITES[k], l) for k, l in dicts] + [Site("mlp_in", l) for _, l in dicts]).acts
    box, out = {}, {}

    def upstream_write(x_in, x_out):
        d = dicts[ku]
        a = d.encode(x_in)
        e = x_out - d.decode(a)
        mask = (idx == gu)
        if fu >= 0:
            a = a.clone()
            base = s.base.a[ku][gu, fu]
            a[..., fu] = torch.where(mask, a[..., fu] + t * (a[..., fu] - base), a[..., fu])
        else:
            e = torch.where(mask[..., None], e + t * (e - s.base.e[ku][gu]), e)
        return d.decode(a) + e

    def measure(x_in, x_out):
        d = dicts[kd]
        mask = (idx == gd)
        if fd >= 0:
            a = d.encode(x_in)[..., fd]
            out["v"] = float((s.grads[kd][0][..., fd] * a * mask).sum())
        else:
            e = x_out - d.decode(d.encode(x_in))
            out["v"] = float((s.grads[kd][1] * e * mask[..., None]).sum())
        return x_out

    edit = {}
    for k in dicts:
        kind, l = k
        site = Site(WRITES[kind], l)
        if k == ku:
            fn = upstream_write
        elif rank(ku) < rank(k) < rank(kd):
            edit[site] = lambda x, site=site: clean[site]
            continue
        elif k == kd:
            fn = measure
        else:
            continue
        if kind == "transcoder":
            edit[Site("mlp_in", l)] = lambda x, l=l: box.__setitem__(l, x) or x
            edit[site] = lambda y, fn=fn, l=l: fn(box[l], y)
        else:
            edit[site] = lambda x, fn=fn: fn(x, x)
    hm.run(batch.input_ids, batch.attention_mask, edit=edit)
    return out["v"]


def test_edges_match_finite_differences_and_first_order_ablation(setup):
    hm, dicts, batch, s, sel = setup
    E = [e for e in edges(hm, batch, dicts, s, sel) if abs(e.weight) > 1e-6]
    random.Random(0).shuffle(E)
    E = sorted(E[:40], key=lambda e: -abs(e.weight))[:16]
    ablated = []
    for e in E:
        # The models round through float32 (RMSNorm, softmax) and the dictionaries have ReLU kinks:
        # small steps drown in rounding, large ones cross kinks. The edge must match at some step.
        fds = [(downstream_value(hm, batch, dicts, s, e.src, e.dst, eps)
                - downstream_value(hm, batch, dicts, s, e.src, e.dst, -eps)) / (2 * eps) for eps in (1e-1, 1e-2, 1e-3)]
        assert min(abs(fd - e.weight) for fd in fds) < 2e-6 + 1e-2 * abs(e.weight), (e, fds)
        # the full ablation (t = −1): the downstream node's change, to first order the edge
        ablated.append(downstream_value(hm, batch, dicts, s, e.src, e.dst, 0.0)
                       - downstream_value(hm, batch, dicts, s, e.src, e.dst, -1.0))
    corr = np.corrcoef([e.weight for e in E], ablated)[0, 1]
    print(f"\nedge vs measured change under full ablation of the upstream node: r = {corr:.3f}")
    assert corr > 0.8
