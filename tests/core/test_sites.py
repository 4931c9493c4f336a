"""Hook sites on a tiny random model of every family: identities, no-op insertions, early exit,
start-at, edits and gradients checked against finite differences."""

from __future__ import annotations

import pytest
import torch

from icl_cli.core.arch import locate
from icl_cli.core.sites import SITE_KINDS, HookedModel, Site, add_at, replace_at
from icl_cli.core.errors import IclError
from tests.core.tiny_models import FAMILIES, VOCAB, tiny_model

B, P = 2, 7


@pytest.fixture(scope="module", params=FAMILIES)
def hm(request) -> HookedModel:
    return HookedModel(tiny_model(request.param))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, P), generator=torch.Generator().manual_seed(1))


def _all_reads(hm: HookedModel, ids: torch.Tensor):
    return hm.run(ids, read=hm.sites())


def test_sites_match_hf_and_the_residual_identities(hm, ids):
    out = _all_reads(hm, ids)
    ref = hm.model(input_ids=ids, use_cache=False, output_hidden_states=True)
    assert torch.equal(out.logits, ref.logits)  # reading changes nothing
    loc = locate(hm.model)
    for l in range(hm.n_layers):
        a = {k: out.acts[Site(k, l)] for k in SITE_KINDS}
        assert a["resid_pre"].shape == (B, P, hm.d_model)
        torch.testing.assert_close(a["resid_pre"], ref.hidden_states[l], rtol=0, atol=0)
        torch.testing.assert_close(a["resid_mid"], a["resid_pre"] + a["attn_out"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a["resid_post"], a["resid_mid"] + a["mlp_out"], rtol=1e-6, atol=1e-6)
        norm = getattr(loc.blocks[l].block, loc.spec.mlp_norm)
        torch.testing.assert_close(a["mlp_in"], norm(a["resid_mid"]))
        if l + 1 < hm.n_layers:
            assert torch.equal(a["resid_post"], out.acts[Site("resid_pre", l + 1)])
    # the last resid_post is the input of the final norm
    last = out.acts[Site("resid_post", hm.n_layers - 1)]
    torch.testing.assert_close(loc.final_norm(last), ref.hidden_states[-1], rtol=1e-6, atol=1e-6)


def test_noop_insertions_keep_the_logits(hm, ids):
    base = hm.run(ids).logits
    every = hm.sites()
    same = hm.run(ids, edit={s: (lambda x: x) for s in every}).logits
    assert torch.equal(same, base)

    torch.manual_seed(0)
    recon = torch.nn.Linear(hm.d_model, hm.d_model)  # a stand-in "SAE": recon + error = x
    spliced = hm.run(ids, edit={s: (lambda x: recon(x) + (x - recon(x))) for s in every}).logits
    torch.testing.assert_close(spliced, base, rtol=1e-4, atol=1e-4)


def test_early_exit_gives_the_same_sites_and_skips_later_blocks(hm, ids):
    full = _all_reads(hm, ids)
    loc = locate(hm.model)
    for stop in range(hm.n_layers):
        calls = []
        h = loc.blocks[-1].attn_out.register_forward_hook(lambda *a: calls.append(1))
        try:
            out = hm.run(ids, read=hm.sites(layers=range(stop + 1)), stop_after=stop)
        finally:
            h.remove()
        assert out.logits is None
        assert bool(calls) == (stop == hm.n_layers - 1)
        for s, v in out.acts.items():
            assert torch.equal(v, full.acts[s]), s


def test_early_exit_at_a_resid_pre_read_does_not_run_that_block(hm, ids):
    # a harvest of resid_pre[l] needs blocks 0..l-1 only; a read inside block l still runs it
    full = _all_reads(hm, ids)
    loc = locate(hm.model)
    for l in range(hm.n_layers):
        for reads, runs_block in (([Site("resid_pre", l)], False), ([Site("resid_pre", l), Site("mlp_in", l)], True)):
            ran = []
            h = loc.blocks[l].attn_out.register_forward_hook(lambda *a: ran.append(1))
            try:
                out = hm.run(ids, read=reads + ([Site("resid_post", l - 1)] if l else []), stop_after=l)
            finally:
                h.remove()
            assert bool(ran) == runs_block, (l, reads)
            for s, v in out.acts.items():
                assert torch.equal(v, full.acts[s]), s
    # an edit at resid_pre[l] is applied before the exit and seen by the read of resid_post[l-1]
    v = torch.randn(hm.d_model, generator=torch.Generator().manual_seed(3))
    l = hm.n_layers - 1
    out = hm.run(ids, read=[Site("resid_post", l - 1)], edit={Site("resid_pre", l): add_at(v)}, stop_after=l)
    torch.testing.assert_close(out.acts[Site("resid_post", l - 1)], full.acts[Site("resid_pre", l)] + v)

def test_start_at_reuses_the_residual_below(hm, ids):
    full = _all_reads(hm, ids)
    loc = locate(hm.model)
    v = torch.randn(hm.d_model, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(B, P, dtype=torch.bool)
    mask[:, 3] = True
    for start in range(1, hm.n_layers):
        calls = []
        h = loc.blocks[0].attn_out.register_forward_hook(lambda *a: calls.append(1))
        try:
            out = hm.run(ids, read=[Site("resid_post", start)], start_at=start,
                         start_resid=full.acts[Site("resid_pre", start)])
        finally:
            h.remove()
        assert not calls  # block 0 did not run
        assert torch.equal(out.logits, full.logits)
        assert torch.equal(out.acts[Site("resid_post", start)], full.acts[Site("resid_post", start)])
        # the cleaning pattern: steer at resid_pre[start] from the cached residual
        edit = {Site("resid_pre", start): add_at(v, mask)}
        steered = hm.run(ids, edit=edit).logits
        cached = hm.run(ids, edit=edit, start_at=start, start_resid=full.acts[Site("resid_pre", start)]).logits
        torch.testing.assert_close(cached, steered, rtol=0, atol=0)
    assert "forward" not in loc.blocks[0].block.__dict__  # the pass-through was removed


def test_resid_mid_edit_equals_adding_to_the_stream(hm, ids):
    v = torch.randn(hm.d_model, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(B, P, dtype=torch.bool)
    mask[0, 2] = mask[1, 5] = True
    l = hm.n_layers // 2
    base = hm.run(ids, read=[Site("resid_mid", l)])
    via_mid = hm.run(ids, read=[Site("resid_mid", l), Site("resid_post", l)],
                     edit={Site("resid_mid", l): add_at(v, mask, scale=3.0)})
    # adding to attn_out adds the same vector to the stream, with no subtraction involved
    via_attn = hm.run(ids, read=[Site("resid_post", l)], edit={Site("attn_out", l): add_at(v, mask, scale=3.0)})
    expected_mid = base.acts[Site("resid_mid", l)] + 3.0 * mask[..., None] * v
    torch.testing.assert_close(via_mid.acts[Site("resid_mid", l)], expected_mid, rtol=0, atol=0)
    torch.testing.assert_close(via_mid.acts[Site("resid_post", l)], via_attn.acts[Site("resid_post", l)])
    torch.testing.assert_close(via_mid.logits, via_attn.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(via_mid.logits, base.logits)
    # replacing resid_mid really replaces the stream (resid_post - mlp_out == the new value)
    rep = hm.run(ids, read=[Site("resid_post", l), Site("mlp_out", l)],
                 edit={Site("resid_mid", l): replace_at(v, mask)})
    stream = rep.acts[Site("resid_post", l)] - rep.acts[Site("mlp_out", l)]
    torch.testing.assert_close(stream[mask], v.expand(2, -1), rtol=1e-5, atol=1e-5)


def test_resid_post_edit_is_seen_by_the_next_block_and_vice_versa(hm, ids):
    v = torch.randn(hm.d_model, generator=torch.Generator().manual_seed(4))
    out = hm.run(ids, read=[Site("resid_post", 0), Site("resid_pre", 1)],
                 edit={Site("resid_pre", 1): add_at(v)})
    assert torch.equal(out.acts[Site("resid_post", 0)], out.acts[Site("resid_pre", 1)])
    a = hm.run(ids, edit={Site("resid_post", 0): add_at(v)}).logits
    torch.testing.assert_close(a, out.logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_at_every_site_matches_finite_differences(family):
    hm = HookedModel(tiny_model(family, dtype=torch.float64, n_layers=2))
    ids = torch.randint(3, VOCAB, (B, P), generator=torch.Generator().manual_seed(5))
    w = torch.randn(B, P, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(7)

    def loss(logits):
        return (logits.log_softmax(-1) * w).sum()

    for site in hm.sites(layers=[1]) + [Site("resid_mid", 0)]:
        z = torch.zeros(B, P, hm.d_model, dtype=torch.float64, requires_grad=True)
        out = hm.run(ids, read=[site], edit={site: lambda x: x + z}, grad=True)
        g_z, g_read = torch.autograd.grad(loss(out.logits), [z, out.acts[site]])
        torch.testing.assert_close(g_read, g_z, rtol=1e-10, atol=1e-12)
        # a plain read (no edit) carries the same gradient
        plain = hm.run(ids, read=[site], grad=True)
        (g_plain,) = torch.autograd.grad(loss(plain.logits), [plain.acts[site]])
        torch.testing.assert_close(g_plain, g_z, rtol=1e-8, atol=1e-10)
        for _ in range(3):
            b, p, d = (int(torch.randint(n, (1,), generator=gen)) for n in (B, P, hm.d_model))
            eps = 1e-3  # RMSNorms compute in float32 even in a float64 model
            dz = torch.zeros(B, P, hm.d_model, dtype=torch.float64)
            dz[b, p, d] = eps
            up = loss(hm.run(ids, edit={site: lambda x: x + dz}).logits)
            down = loss(hm.run(ids, edit={site: lambda x: x - dz}).logits)
            fd = (up - down) / (2 * eps)
            assert abs(fd.item() - g_z[b, p, d].item()) <= 1e-3 * max(1.0, abs(fd.item())), (site, b, p, d)


def test_gradients_reach_an_inserted_module():
    """An SAE-style splice: recon(f) + error, with the error held as its own node."""
    hm = HookedModel(tiny_model("gemma", dtype=torch.float64, n_layers=2))
    ids = torch.randint(3, VOCAB, (B, P), generator=torch.Generator().manual_seed(8))
    torch.manual_seed(0)
    enc = torch.nn.Linear(hm.d_model, 16, dtype=torch.float64)
    dec = torch.nn.Linear(16, hm.d_model, dtype=torch.float64)
    store = {}

    def splice(x):
        f = torch.relu(enc(x)).detach().requires_grad_()
        recon = dec(f)
        store["f"] = f
        return recon + (x - recon).detach()

    site = Site("mlp_out", 0)
    base = hm.run(ids).logits
    out = hm.run(ids, read=[site], edit={site: splice}, grad=True)
    torch.testing.assert_close(out.logits, base)
    g_f, g_site = torch.autograd.grad(out.logits[:, -1].logsumexp(-1).sum(), [store["f"], out.acts[site]])
    assert g_f.abs().sum() > 0
    torch.testing.assert_close(g_f, g_site @ dec.weight)  # the chain rule through the decoder


def test_gemma2_sites_include_its_post_norms(ids):
    model = tiny_model("gemma2")
    hm = HookedModel(model)
    block = model.model.layers[0]
    raw = {}
    hooks = [
        block.self_attn.register_forward_hook(lambda m, a, o: raw.__setitem__("attn", o[0])),
        block.mlp.register_forward_hook(lambda m, a, o: raw.__setitem__("mlp", o)),
    ]
    try:
        out = hm.run(ids, read=hm.sites(layers=[0]))
    finally:
        for h in hooks:
            h.remove()
    attn_out, mlp_out = out.acts[Site("attn_out", 0)], out.acts[Site("mlp_out", 0)]
    assert not torch.allclose(attn_out, raw["attn"])
    torch.testing.assert_close(attn_out, block.post_attention_layernorm(raw["attn"]), rtol=0, atol=0)
    torch.testing.assert_close(mlp_out, block.post_feedforward_layernorm(raw["mlp"]), rtol=0, atol=0)
    torch.testing.assert_close(out.acts[Site("mlp_in", 0)], block.pre_feedforward_layernorm(out.acts[Site("resid_mid", 0)]))


def test_padded_batches_pass_the_attention_mask():
    hm = HookedModel(tiny_model("llama"))
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    out = hm.run(ids, mask, read=[Site("resid_post", 2)])
    alone = hm.run(ids[1:, :4], read=[Site("resid_post", 2)])
    torch.testing.assert_close(out.acts[Site("resid_post", 2)][1, :4], alone.acts[Site("resid_post", 2)][0])


def test_add_at_and_replace_at():
    x = torch.zeros(2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    v = torch.arange(8.0).reshape(2, 4)
    y = add_at(v, mask, scale=2.0)(x)
    assert torch.equal(y[0, 0], 2 * v[0]) and torch.equal(y[1, 2], 2 * v[1])
    assert y[~mask].abs().sum() == 0
    z = replace_at(torch.ones(4), mask)(x + 5)
    assert torch.equal(z[mask], torch.ones(2, 4)) and torch.equal(z[~mask], torch.full((4, 4), 5.0))
    assert add_at(torch.ones(4))(x).sum() == 24


def test_site_parse_and_str():
    assert Site.parse("resid_pre.3") == Site("resid_pre", 3)
    assert Site.parse("mlp_out[12]") == Site("mlp_out", 12)
    assert str(Site("resid_mid", 0)) == "resid_mid.0"
    assert {Site.parse(str(Site(k, 2))) for k in SITE_KINDS} == {Site(k, 2) for k in SITE_KINDS}
    for bad in ("resid.3", "resid_pre", "resid_pre.x", "resid_pre.-1"):
        with pytest.raises(IclError):
            Site.parse(bad)


def test_bad_requests_are_clear_errors_and_hooks_are_always_removed(ids):
    model = tiny_model("gemma")
    hm = HookedModel(model)
    with pytest.raises(IclError, match="out of range"):
        hm.run(ids, read=[Site("resid_pre", 3)])
    with pytest.raises(IclError, match="after stop_after"):
        hm.run(ids, read=[Site("resid_pre", 2)], stop_after=1)
    with pytest.raises(IclError, match="before start_at"):
        hm.run(ids, read=[Site("resid_pre", 0)], start_at=1, start_resid=torch.zeros(B, P, 48))
    with pytest.raises(IclError, match="shape"):
        hm.run(ids, start_at=1, start_resid=torch.zeros(B, P + 1, 48))
    with pytest.raises(IclError, match="returned"):
        hm.run(ids, edit={Site("attn_out", 1): lambda x: x[:, :1]}, start_at=1, start_resid=torch.zeros(B, P, 48))

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        hm.run(ids, edit={Site("mlp_out", 2): boom}, read=hm.sites(layers=[1, 2]), start_at=1, start_resid=torch.zeros(B, P, 48))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert "forward" not in m.__dict__


def test_unsupported_architecture_is_a_clear_error():
    import transformers as tr

    model = tr.AutoModelForCausalLM.from_config(tr.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                            ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(IclError, match="unsupported architecture 'opt'"):
        HookedModel(model)
