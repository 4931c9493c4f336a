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
    single = edges(hm, batch, dicts, s, sel, method="per-node")
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


# ---- the batched path (one forward, closed-form seeds, vmapped backward) against the references ----

def _suite(d_model: int, layers, arch: str, kinds=("resid", "attn", "transcoder"), cls=None):
    """tiny_suite in float64 with every parameter the encoders use away from its neutral value
    (gated: r_mag ≠ 0 and b_gate ≠ b_mag, JumpReLU: thresholds that switch features off)."""
    dicts = tiny_suite(d_model, layers, d_sae=16, arch=arch, dtype=torch.float64, seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for d in dicts.values():
            if arch == "gated":
                d.r_mag.copy_(0.5 * torch.randn(d.cfg.d_sae, generator=g))
                d.b_gate.copy_(torch.rand(d.cfg.d_sae, generator=g) * 0.6 - 0.3)
                d.b_mag.copy_(torch.rand(d.cfg.d_sae, generator=g) * 0.6 - 0.3)
            if arch == "jumprelu":
                d.threshold.copy_(torch.rand(d.cfg.d_sae, generator=g) * 0.3)
    if cls is not None:
        for d in dicts.values():
            d.__class__ = cls
    return {k: d for k, d in dicts.items() if k[0] in kinds}


def _select(s, n: int = 4):
    sel = {}
    for k in s.keys:
        flat = [(abs(float(s.ie[k][g, f])), g, f) for g, f in torch.nonzero(s.ie[k]).tolist()]
        sel[k] = [(g, f) for _, g, f in sorted(flat, reverse=True)[:n]] + [(1, -1), (3, -1)]
    return sel


def _same(a, b, n_min: int = 20):
    """Same edges, weights equal to rounding."""
    wa, wb = {(e.src, e.dst): e.weight for e in a}, {(e.src, e.dst): e.weight for e in b}
    assert wa.keys() == wb.keys() and len(wa) >= n_min
    scale = max(abs(w) for w in wb.values())
    assert scale > 1e-4
    worst = max(abs(wa[k] - wb[k]) for k in wa)
    assert worst < 1e-10 * scale, worst


@pytest.fixture(scope="module")
def lm64(tiny_toy_dir):
    return tiny_toy64(tiny_toy_dir)


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk"])
def test_batched_equals_tiled_and_per_node_for_every_encoder(lm64, arch):
    """resid, attn and transcoder dictionaries of each architecture (closed-form seeds), every
    consecutive pair, feature and error nodes on both ends, chunks smaller than a site's rows."""
    hm = HookedModel(lm64.model)
    dicts = _suite(lm64.d_model, range(lm64.n_layers), arch)
    batch = toy_batch(lm64, n_prompts=2, n_shot=3)
    s = node_scores(hm, batch, dicts, "atp", "mean")
    sel = _select(s)
    new = edges(hm, batch, dicts, s, sel, max_rows=8)  # 4 rows a chunk
    _same(new, edges(hm, batch, dicts, s, sel, method="per-node"))
    _same(new, edges(hm, batch, dicts, s, sel, max_rows=8, method="tiled"))
    kinds = {(e.src[0][0], e.dst[0][0], e.src[2] < 0, e.dst[2] < 0) for e in new}
    for pair in [("resid", "attn"), ("resid", "transcoder"), ("attn", "transcoder"), ("resid", "resid"),
                 ("attn", "resid"), ("transcoder", "resid")]:
        assert {pair + (False, False), pair + (True, True)} <= kinds, pair


class _OtherSAE(type(tiny_suite(4, [0], d_sae=4)[("resid", 0)])):
    """A dictionary class without a closed form: feature seeds by autograd through encode."""


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_through_whole_blocks_and_autograd_seeds(lm64, attn):
    """Without transcoders, edges into resid[l+1] run block l (attention and MLP) in the vmapped
    backward; an unknown dictionary class takes the autograd seeds; both attention kernels."""
    lm64.model.set_attn_implementation(attn)
    hm = HookedModel(lm64.model)
    batch = toy_batch(lm64, n_prompts=2, n_shot=3)
    for cls in (None, _OtherSAE):
        dicts = _suite(lm64.d_model, range(lm64.n_layers), "standard", kinds=("resid", "attn"), cls=cls)
        s = node_scores(hm, batch, dicts, "atp", "mean")
        sel = _select(s)
        new = edges(hm, batch, dicts, s, sel, max_rows=10)
        _same(new, edges(hm, batch, dicts, s, sel, method="per-node"))
        assert {(e.src[0][0], e.dst[0][0]) for e in new} == {("resid", "attn"), ("resid", "resid"), ("attn", "resid")}


def test_batched_without_vmap_falls_back_to_one_backward_per_seed(lm64, monkeypatch):
    """A missing batching rule (RuntimeError from is_grads_batched) gives the same edges."""
    hm = HookedModel(lm64.model)
    dicts = _suite(lm64.d_model, range(lm64.n_layers), "gated")
    batch = toy_batch(lm64, n_prompts=2, n_shot=3)
    s = node_scores(hm, batch, dicts, "atp", "mean")
    sel = _select(s)
    ref = edges(hm, batch, dicts, s, sel, method="per-node")
    grad, calls = torch.autograd.grad, []

    def no_vmap(*a, **k):
        if k.get("is_grads_batched") and k.get("retain_graph"):  # the block backward, not the seeds
            calls.append(1)
            raise RuntimeError("Batching rule not implemented")
        return grad(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    _same(edges(hm, batch, dicts, s, sel, max_rows=16), ref)
    assert calls


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk"])
def test_feature_seeds_are_the_encoder_gradient(arch):
    """feature_seeds(x, f, w)[k] = ∂(Σ w[k]·a_f[k](x))/∂x, by plain autograd through encode, one row at a time."""
    from icl_cli.circuit.edges import Rank1, feature_seeds

    d = _suite(8, [0], arch)[("resid", 0)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
    Fs = torch.tensor([3, 0, 3, 11, 15])
    w = torch.randn(5, 2, 5, dtype=torch.float64, generator=g)
    got = feature_seeds(d, x, Fs, w)
    assert isinstance(got, Rank1)
    for k in range(5):
        xg = x.clone().requires_grad_()
        (w[k] * d.encode(xg)[..., Fs[k]]).sum().backward()
        assert torch.allclose(got.dense()[k], xg.grad, rtol=1e-12, atol=1e-14)
    assert got.c.count_nonzero() > 10
