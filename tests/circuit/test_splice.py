"""The spliced model: output unchanged, every feature and error differentiable, gradients equal to
the unmodified model's (finite differences), transcoder error = mlp_out − T(mlp_in)."""

from __future__ import annotations

import pytest
import torch

from icl_cli.circuit.splice import Transparent, ordered, splice_edits
from icl_cli.core.sites import HookedModel, Site
from tests.circuit.helpers import tiny_suite
from tests.core.tiny_models import tiny_model


@pytest.mark.parametrize("family", ["gemma2", "llama", "gpt2"])
def test_logits_unchanged_and_gradients_reach_every_node(family):
    model = tiny_model(family, n_layers=2)
    hm = HookedModel(model)
    dicts = tiny_suite(48, range(2), d_sae=64)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = hm.run(ids).logits
    h = Transparent(dicts)
    out = hm.run(ids, edit=splice_edits(ordered(dicts), h), grad=True)
    assert (out.logits - plain).abs().max() < 1e-5
    leaves = [t for k in ordered(dicts) for t in h.acts[k]]
    grads = torch.autograd.grad(out.logits[:, -3:].logsumexp(-1).sum() + out.logits[:, -1, 5].sum(), leaves)
    for (key, part), gr in zip([(k, p) for k in ordered(dicts) for p in ("a", "e")], grads):
        assert gr.abs().sum() > 0, f"no gradient reaches {part} at {key}"
    # transcoder: a = T.encode(mlp_in), e = mlp_out − T(mlp_in), read from an unspliced pass
    r = hm.run(ids, read=[Site("mlp_in", 1), Site("mlp_out", 1)])
    T = dicts[("transcoder", 1)]
    a, e = h.acts[("transcoder", 1)]
    torch.testing.assert_close(a, T.encode(r.acts["mlp_in.1"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e, r.acts["mlp_out.1"] - T(r.acts["mlp_in.1"]), atol=1e-5, rtol=1e-5)


def test_feature_gradient_is_the_unmodified_models_derivative():
    """∂m/∂a[b,p,f] = d m(x_out + ε·W_dec[f] at (b,p)) / dε of the plain model (central differences)."""
    model = tiny_model("gemma2", n_layers=2, dtype=torch.float64)
    hm = HookedModel(model)
    dicts = tiny_suite(48, range(2), d_sae=32, dtype=torch.float64)
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(1))

    def metric(logits):
        return torch.log_softmax(logits[0, -1], -1)[7] + torch.log_softmax(logits[0, 4], -1)[9]

    h = Transparent(dicts)
    out = hm.run(ids, edit=splice_edits(ordered(dicts), h), grad=True)
    keys = [("resid", 0), ("attn", 0), ("transcoder", 0), ("attn", 1)]
    grads = torch.autograd.grad(metric(out.logits), [h.acts[k][0] for k in keys] + [h.acts[("attn", 1)][1]])
    site = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "mlp_out"}
    # HF attention takes its softmax in float32: steps of 1e-2 keep rounding below the tolerance
    eps, pos, f = 1e-2, 3, 5
    for key, gr in zip(keys, grads):
        W = dicts[key].W_dec[f]

        def m_at(t):
            def add(x):
                x = x.clone()
                x[0, pos] += t * W
                return x
            return float(metric(hm.run(ids, edit={Site(site[key[0]], key[1]): add}).logits))

        fd = (m_at(eps) - m_at(-eps)) / (2 * eps)
        assert abs(float(gr[0, pos, f]) - fd) < 2e-6 + 1e-3 * abs(fd), key
    # error: ∂m/∂e = ∂m/∂attn_out
    d = torch.randn(48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def m_err(t):
        def add(x):
            x = x.clone()
            x[0, pos] += t * d
            return x
        return float(metric(hm.run(ids, edit={Site("attn_out", 1): add}).logits))

    fd = (m_err(eps) - m_err(-eps)) / (2 * eps)
    assert abs(float(grads[-1][0, pos] @ d) - fd) < 2e-6 + 1e-3 * abs(fd)
