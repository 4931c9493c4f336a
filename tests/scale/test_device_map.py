"""A model split by accelerate (``--device-map``) gives the unsplit model's reads, steered logits and
gradients through the hooks.

On a CPU-only machine accelerate can split a model over "cpu" and "disk": blocks mapped to "disk"
keep their weights in an offload folder and are loaded for each forward pass (their parameters
are on the "meta" device in between). That exercises the same hook machinery as a multi-GPU split
(accelerate's forward wrappers, parameters not where the input is). Each check compares against
the same weights loaded without a device map.
"""

from __future__ import annotations

import pytest
import torch

from icl_cli.core.models import load_model
from icl_cli.core.sites import HookedModel, Site, add_at
from tests.core.tiny_models import tiny_model

pytest.importorskip("accelerate")

N_LAYERS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_gemma2")
    model = tiny_model("gemma2", n_layers=N_LAYERS, d_model=32, seed=3)
    model.save_pretrained(out)
    _tokenizer(out)
    return out


def _tokenizer(out):
    """A tiny word-level tokenizer so load_model can load the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>").save_pretrained(out)


SPLIT = {
    "model.embed_tokens": "disk",   # even the input embedding lives on disk between passes
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def pair(folder, tmp_path_factory):
    torch.set_num_threads(1)
    plain = load_model(str(folder), device="cpu", dtype="float32")
    split = load_model(str(folder), dtype="float32", device_map=dict(SPLIT),
                       offload_folder=str(tmp_path_factory.mktemp("offload")))
    return plain, split


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding on one row
    return ids, mask


def test_split_is_real(pair):
    _, split = pair
    model = split.model
    assert getattr(model, "hf_device_map", None) is not None
    metas = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert any(n.startswith("model.layers.1.") for n in metas)  # offloaded between passes
    assert any(n.startswith("model.embed_tokens") or n.startswith("lm_head") for n in metas)
    assert split.device == torch.device("cpu")  # the device inputs go to, not "meta"


def test_reads_equal(pair):
    plain, split = pair
    ids, mask = _batch()
    sites = HookedModel(plain.model).sites()
    a = HookedModel(plain.model).run(ids, mask, read=sites)
    b = HookedModel(split.model).run(ids, mask, read=sites)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    for s in sites:
        torch.testing.assert_close(b.acts[s], a.acts[s], rtol=1e-5, atol=1e-5, msg=str(s))


def test_steered_logits_and_early_exit_equal(pair):
    plain, split = pair
    ids, mask = _batch()
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[:, -2] = True
    edit = {Site("resid_pre", 2): add_at(v, at, scale=3.0), Site("resid_mid", 1): add_at(-v, None, scale=0.5)}
    a = HookedModel(plain.model).run(ids, mask, edit=edit)
    b = HookedModel(split.model).run(ids, mask, edit=edit)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    unsteered = HookedModel(plain.model).run(ids, mask).logits
    assert (a.logits - unsteered).abs().max() > 1e-2  # the edit did something
    # stop early, then restart from a given residual (clean and circuit run only blocks >= l)
    site = Site("resid_pre", 2)
    ra = HookedModel(plain.model).run(ids, mask, read=[site], stop_after=2)
    rb = HookedModel(split.model).run(ids, mask, read=[site], stop_after=2)
    assert ra.logits is None and rb.logits is None
    torch.testing.assert_close(rb.acts[site], ra.acts[site], rtol=1e-5, atol=1e-5)
    ta = HookedModel(plain.model).run(ids, mask, start_at=2, start_resid=ra.acts[site] + 0.1)
    tb = HookedModel(split.model).run(ids, mask, start_at=2, start_resid=ra.acts[site] + 0.1)
    torch.testing.assert_close(tb.logits, ta.logits, rtol=1e-5, atol=1e-5)


def _grads(lm, ids, mask):
    """d loss / d steering vector (clean's gradient) and d loss / d reads (circuit's)."""
    hm = HookedModel(lm.model)
    v = torch.zeros(32, requires_grad=True)
    with torch.no_grad():
        v += torch.linspace(-1, 1, 32)
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[:, -3] = True
    reads = [Site("attn_out", 1), Site("mlp_out", 2), Site("resid_mid", 3)]
    out = hm.run(ids, mask, read=reads, edit={Site("resid_pre", 1): add_at(v, at)}, grad=True)
    target = ids[:, -1].to(out.logits.device)
    loss = torch.nn.functional.cross_entropy(out.logits[:, -2].float(), target)
    gs = torch.autograd.grad(loss, [v, *[out.acts[s] for s in reads]])
    # the restart path with grad (circuit's sweep): gradient w.r.t. the given residual
    start = hm.run(ids, mask, read=[Site("resid_pre", 2)], stop_after=2).acts[Site("resid_pre", 2)].clone().requires_grad_()
    out2 = hm.run(ids, mask, start_at=2, start_resid=start, grad=True)
    g2 = torch.autograd.grad(out2.logits[:, -1].logsumexp(-1).sum(), start)[0]
    return [*gs, g2]


def test_gradients_equal(pair):
    plain, split = pair
    ids, mask = _batch()
    ga, gb = _grads(plain, ids, mask), _grads(split, ids, mask)
    for x, y in zip(ga, gb):
        assert x.abs().max() > 0
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)


def test_device_map_auto_on_cpu(folder):
    lm = load_model(str(folder), dtype="float32", device_map="auto")
    assert lm.device == torch.device("cpu")
    ids, mask = _batch()
    out = HookedModel(lm.model).run(ids, mask, read=["resid_post.3"])
    assert out.logits.shape == (3, 9, 97)
