"""Dictionaries without sae_lens: formulas, gradients, normalisation folding, readers, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from icl_cli.dictionaries import DictConfig, build, import_sae, load_dictionary, save_saelens
from icl_cli.core.errors import IclError

ARCHS = ("standard", "gated", "topk", "jumprelu")


def perturbed(arch: str, d_in: int = 32, d_sae: int = 128, seed: int = 0, **kw):
    torch.manual_seed(seed)
    d = build(DictConfig(d_in=d_in, d_sae=d_sae, arch=arch, k=8, **kw))
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if arch == "jumprelu":
            d.threshold.abs_()
    return d


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_is_activate_of_encode_pre(arch):
    d = perturbed(arch)
    x = torch.randn(64, 32)
    a = d.encode(x)
    torch.testing.assert_close(d.activate(d.encode_pre(x)), a, atol=1e-5, rtol=1e-5)
    assert d.W_dec.shape == (128, 32)
    assert d(x).shape == (64, 32)
    assert (a >= 0).all() and (a > 0).any()


def test_gated_threshold_form_equals_gate():
    d = perturbed("gated")
    x = torch.randn(256, 32)
    proj = (x - d.b_dec) @ d.W_enc
    gate = (proj + d.b_gate) > 0
    pre = d.encode_pre(x)
    # away from the boundary the threshold form and the gate agree exactly
    safe = (proj + d.b_gate).abs() > 1e-4
    assert torch.equal(((pre > d.threshold) & safe), (gate & safe))


def test_topk_sparse_training_gradients_match_dense_autograd():
    d = perturbed("topk")
    x = torch.randn(40, 32)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[:50] = True
    d.training_loss(x, x, 0.0, dead).loss.backward()
    sparse = {n: p.grad.clone() for n, p in d.named_parameters()}
    d.zero_grad()
    recon = d.decode(d.activate(d.encode_pre(x)))
    mse = (recon - x).pow(2).sum(-1).mean()
    (mse + d._auxk(x, x - recon.detach(), dead)).backward()
    for n, p in d.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, atol=1e-5, rtol=1e-4)


def test_jumprelu_threshold_gets_pseudo_gradient():
    d = perturbed("jumprelu")
    x = torch.randn(512, 32)
    with torch.no_grad():
        d.threshold.copy_(d.encode_pre(x).median(0).values.clamp_min(1e-3))
    d.training_loss(x, x, 1.0).loss.backward()
    assert d.threshold.grad is not None and d.threshold.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_normalisation_matches_training_space(arch):
    d = perturbed(arch)
    x = torch.randn(64, 32) * 7.0
    n = 0.37
    before = d(x * n) / n  # what the trained dictionary computes, mapped back to model space
    acts = d.encode(x * n)
    d.fold_normalisation(n, n)
    torch.testing.assert_close(d.encode(x), acts, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d(x), before, atol=1e-4, rtol=1e-4)


def test_transcoder_fold_uses_separate_scales():
    d = perturbed("standard", site="transcoder", d_out=24)
    assert not d.cfg.apply_b_dec_to_input and d.W_dec.shape == (128, 24)
    x = torch.randn(16, 32)
    want = d(x * 2.0) / 0.5
    d.fold_normalisation(2.0, 0.5)
    torch.testing.assert_close(d(x), want, atol=1e-4, rtol=1e-4)


def write_authors(path, d=32, d_sae=96, tgt=True, seed=0):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(d, d_sae, generator=g) / math.sqrt(d),
        "b_enc": 0.1 * torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d, generator=g) / math.sqrt(d_sae),
        "b_dec": 0.1 * torch.randn(d, generator=g),
        "s_gate": 0.5 * torch.randn(d_sae, generator=g),
        "b_gate": 0.3 * torch.randn(d_sae, generator=g),
        "scaling_factor": torch.tensor(1.7),
        "mean_norm": torch.tensor(12.0),
    }
    if tgt:
        t["tgt_mean_norm"] = torch.tensor(9.0)
    save_file(t, str(path))
    return t


def authors_reference(t, x):
    """SPEC §9, written out literally."""
    d = t["b_dec"].shape[0]
    n = math.sqrt(d) / t["mean_norm"]
    n_out = math.sqrt(d) / t["tgt_mean_norm"] if "tgt_mean_norm" in t else n
    s = F.softplus(t["s_gate"]) * t["scaling_factor"]
    pre = (x * n @ t["W_enc"] + t["b_enc"]) * s
    thr = torch.clamp(t["b_gate"] - t["b_enc"] * s, min=0)
    a = torch.relu(pre) * (torch.relu(pre) > thr)
    return a, (a @ t["W_dec"] + t["b_dec"]) / n_out


@pytest.mark.parametrize("tgt", [True, False])
def test_authors_format_matches_spec_formula(tmp_path, tgt):
    t = write_authors(tmp_path / "sae.safetensors", tgt=tgt)
    d = load_dictionary(tmp_path / "sae.safetensors")
    assert d.cfg.arch == "jumprelu" and d.cfg.extra["format"] == "authors"
    x = torch.randn(200, 32) * 12.0 / math.sqrt(32) * 3
    a_ref, r_ref = authors_reference(t, x)
    assert (a_ref > 0).float().mean() > 0.05  # the test exercises active features
    torch.testing.assert_close(d.encode(x), a_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d(x), r_ref, atol=1e-4, rtol=1e-4)


def test_authors_file_roundtrips_through_saelens_folder(tmp_path):
    t = write_authors(tmp_path / "a.safetensors")
    params = import_sae(tmp_path / "a.safetensors", tmp_path / "out")
    assert params["arch"] == "jumprelu" and params["d_sae"] == 96 and params["format"] == "authors"
    d = load_dictionary(tmp_path / "out")
    x = torch.randn(50, 32)
    torch.testing.assert_close(d(x), authors_reference(t, x)[1], atol=1e-4, rtol=1e-4)


def test_store_import_kind_sae_writes_saelens_layout(tmp_path):
    from icl_cli.store import Store

    d = perturbed("gated", model="toy-icl", site="resid_pre", layer=3)
    save_saelens(d, tmp_path / "src", sparsity=torch.zeros(128))
    res = Store(tmp_path / "store").import_path(tmp_path / "src", "sae")
    art = res.artifact
    assert (art.path / "cfg.json").exists() and (art.path / "sparsity.safetensors").exists()
    assert art.metrics["layer"] == 3 and art.metrics["arch"] == "gated"
    got = load_dictionary(art)
    x = torch.randn(8, 32)
    torch.testing.assert_close(got(x), d(x))


def test_provenance_survives_save_and_load(tmp_path):
    d = perturbed("topk", model="toy-icl", site="attn_out", layer=2)
    save_saelens(d, tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_attn_out"
    got = load_dictionary(tmp_path / "f")
    assert (got.cfg.model, got.cfg.site, got.cfg.layer, got.cfg.k) == ("toy-icl", "attn_out", 2, 8)


def test_reader_errors_are_one_line(tmp_path):
    with pytest.raises(IclError, match="no SAE at"):
        load_dictionary(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text(json.dumps({"architecture": "matryoshka", "d_in": 4, "d_sae": 8}))
    from safetensors.torch import save_file

    save_file({"W_enc": torch.zeros(4, 8)}, str(tmp_path / "bad" / "sae_weights.safetensors"))
    with pytest.raises(IclError, match="not supported"):
        load_dictionary(tmp_path / "bad")
    save_file({"W_enc": torch.zeros(4, 8)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(IclError, match="authors"):
        load_dictionary(tmp_path / "x.safetensors")
    with pytest.raises(IclError, match="positive"):
        DictConfig(d_in=4, d_sae=0)
    with pytest.raises(IclError, match="k > 0"):
        DictConfig(d_in=4, d_sae=8, arch="topk")
