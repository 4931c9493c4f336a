"""Interoperability with SAELens: our folders load in sae_lens, theirs load in ours (same numbers).

sae_lens is imported only here (it costs ~10 s).
"""

from __future__ import annotations

import pytest
import torch

from icl_cli.dictionaries import DictConfig, build, load_dictionary, save_saelens
from icl_cli.core.errors import IclError

sae_lens = pytest.importorskip("sae_lens")

CASES = [  # (our arch, site, d_out)
    ("standard", "resid_pre", 0),
    ("gated", "resid_pre", 0),
    ("topk", "attn_out", 0),
    ("jumprelu", "resid_pre", 0),
    ("standard", "transcoder", 24),
    ("jumprelu", "transcoder", 24),
    ("gated", "transcoder", 0),
    ("topk", "transcoder", 0),
]


def random_dict(arch, site, d_out, seed=0):
    torch.manual_seed(seed)
    d = build(DictConfig(d_in=32, d_sae=128, d_out=d_out, arch=arch, site=site, layer=1, k=8, model="tiny"))
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if arch == "jumprelu":
            d.threshold.abs_()
    d.fold_normalisation(1.9, 0.7 if site == "transcoder" else 1.9)
    return d


def fill(sae, seed=1):
    """Random weights (sae_lens initialises biases and thresholds at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if name == "threshold":
                p.abs_()
    return sae


@pytest.mark.parametrize("arch,site,d_out", CASES)
def test_our_folder_loads_in_saelens_with_same_encode_decode(tmp_path, arch, site, d_out):
    d = random_dict(arch, site, d_out)
    save_saelens(d, tmp_path, sparsity=torch.full((128,), -3.0))
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    x = torch.randn(64, 32) * 4
    a_ours, a_theirs = d.encode(x), theirs.encode(x)
    assert (a_ours > 0).any()
    torch.testing.assert_close(a_ours, a_theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.decode(a_ours), theirs.decode(a_theirs), atol=1e-4, rtol=1e-4)


def saelens_made():
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    from sae_lens.saes.transcoder import (JumpReLUTranscoder, JumpReLUTranscoderConfig, Transcoder,
                                          TranscoderConfig)

    from sae_lens.saes.sae import SAEMetadata

    meta = {"hook_name": "blocks.3.hook_resid_pre", "model_name": "tiny"}
    return {
        "standard": StandardSAE(StandardSAEConfig(d_in=32, d_sae=128, metadata=SAEMetadata(**meta))),
        "gated": GatedSAE(GatedSAEConfig(d_in=32, d_sae=128)),
        "topk": TopKSAE(TopKSAEConfig(d_in=32, d_sae=128, k=8)),
        "topk-rescaled": TopKSAE(TopKSAEConfig(d_in=32, d_sae=128, k=8, rescale_acts_by_decoder_norm=True)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=128, apply_b_dec_to_input=False)),
        "transcoder": Transcoder(TranscoderConfig(d_in=32, d_sae=128, d_out=24, apply_b_dec_to_input=False)),
        "jumprelu_transcoder": JumpReLUTranscoder(
            JumpReLUTranscoderConfig(d_in=32, d_sae=128, d_out=24, apply_b_dec_to_input=False)),
    }


@pytest.mark.parametrize("kind", ["standard", "gated", "topk", "topk-rescaled", "jumprelu", "transcoder", "jumprelu_transcoder"])
def test_saelens_written_folder_reads_with_same_numbers(tmp_path, kind):
    theirs = fill(saelens_made()[kind]).eval()
    theirs.save_model(tmp_path)
    ours = load_dictionary(tmp_path)
    x = torch.randn(64, 32) * 2
    a = theirs.encode(x)
    assert (a > 0).any()
    torch.testing.assert_close(ours.encode(x), a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours(x), theirs.decode(a), atol=1e-4, rtol=1e-4)
    if kind == "standard":
        assert (ours.cfg.site, ours.cfg.layer, ours.cfg.model) == ("resid_pre", 3, "tiny")
    if "transcoder" in kind:
        assert ours.cfg.is_transcoder and ours.W_dec.shape == (128, 24)


def test_gemma_scope_offline_is_one_line_error(monkeypatch):
    import icl_cli.core.hub as hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-icl-test-cache")
    with pytest.raises(IclError) as err:
        load_dictionary("gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    msg = str(err.value)
    assert "\n" not in msg and "gemma-scope-2b-pt-res-canonical" in msg and "network" in msg
