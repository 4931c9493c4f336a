"""SPEC §9 training and evaluation numbers against computations written here: FVU with centring,
CE loss recovered with hooks of our own, the log10 sparsity file, input scaling, the training
tokens (BOS excluded), and the resampling of dead features."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from icl_cli.core.sites import HookedModel, Site
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.train_sae.data import ActivationSource
from icl_cli.train_sae.evaluate import evaluate
from icl_cli.train_sae.trainer import _resample, _State
from tests.formulas._reference import blocks, hidden_states

LAYER = 1


def chunks_of(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


TEXTS = ["Follow the pattern:\nhot -> cold\nup -> down\nearly ->", "Follow the pattern:\nbig -> small",
         "Follow the pattern:\nchild -> adult\nlight -> dark\nhappy -> sad\nold -> young"]


def random_dict(site: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = build(DictConfig(d_in=32, d_sae=48, arch="standard", site=site, layer=LAYER))
    with torch.no_grad():
        d.W_enc.mul_(0.5)
        d.b_enc.copy_(0.05 * torch.randn(48, generator=g))
        d.b_dec.copy_(0.2 * torch.randn(32, generator=g))
    return d.eval()


def ce_sum(logits, ids, scored):
    """Σ −log p(ids[t] | logits[t−1]) over the scored t ≥ 1 of one row, and their count."""
    total, n = 0.0, 0
    for t in range(1, ids.shape[0]):
        if scored[t]:
            total += float(F.cross_entropy(logits[t - 1 : t].double(), ids[t : t + 1]))
            n += 1
    return total, n


def spliced_logits(model, ids, kind, fn):
    """Logits with fn applied, at every position but BOS, to resid_pre[LAYER] (kind "resid") or
    to the MLP output of block LAYER given its input (kind "transcoder")."""
    block = blocks(model)[LAYER]
    if kind == "resid":
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            new = h.clone()
            new[:, 1:] = fn(h[:, 1:])
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(module, args, out):
            new = out.clone()
            new[:, 1:] = fn(args[0][:, 1:])
            return new

        handle = block.mlp.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()


def mlp_io(model, ids):
    got = {}
    h = blocks(model)[LAYER].mlp.register_forward_hook(lambda m, a, o: got.update(x=a[0], t=o))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return got["x"][0], got["t"][0]


@pytest.mark.parametrize("kind,ce_chunk", [("resid", 512), ("transcoder", 512), ("resid", 3)])
def test_fvu_and_ce_recovered_by_hand(tiny_lm, kind, ce_chunk, monkeypatch):
    import icl_cli.train_sae.evaluate as ev

    monkeypatch.setattr(ev, "CE_CHUNK", ce_chunk)  # 3: the scored positions are unembedded a few at a time
    tok, model = tiny_lm.tokenizer, tiny_lm.model
    d = random_dict("resid_pre" if kind == "resid" else "transcoder")
    chunks = chunks_of(tok, TEXTS)
    targets = [[t % 2 == 1 for t in range(len(c))] for c in chunks]  # score every other token
    reads = [(Site("resid_pre", LAYER), None)] if kind == "resid" else [(Site("mlp_in", LAYER), Site("mlp_out", LAYER))]
    m = evaluate(HookedModel(model), tok, [d], reads, chunks, "cpu", rows=2, targets=targets)[0]

    xs, ts, ce = [], [], {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_scored = 0
    for c, tg in zip(chunks, targets):  # one chunk at a time: no padding anywhere
        ids = torch.tensor([c])
        if kind == "resid":
            x = hidden_states(model, ids, torch.ones_like(ids))[LAYER][0, 1:]
            t = x
        else:
            x, t = mlp_io(model, ids)
            x, t = x[1:], t[1:]
        xs.append(x)
        ts.append(t)
        with torch.no_grad():
            clean = model(input_ids=ids, use_cache=False).logits[0]
        recon = lambda h: d(h)  # noqa: E731
        zero = lambda h: torch.zeros_like(h) if kind == "resid" else torch.zeros(h.shape[:-1] + (32,))  # noqa: E731
        for name, logits in (("clean", clean), ("sae", spliced_logits(model, ids, kind, recon)[0]),
                             ("zero", spliced_logits(model, ids, kind, zero)[0])):
            s, n = ce_sum(logits, ids[0], tg)
            ce[name] += s
        n_scored += n
    x, t = torch.cat(xs), torch.cat(ts)
    with torch.no_grad():
        t_hat = d(x)
        a = d.encode(x)
    fvu = float((t - t_hat).pow(2).sum() / (t - t.mean(0)).pow(2).sum())
    clean, sae, zero = (ce[k] / n_scored for k in ("clean", "sae", "zero"))
    assert m["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert m["l0"] == pytest.approx(float((a > 0).sum(-1).float().mean()), rel=1e-5)
    assert m["eval_tokens"] == x.shape[0]
    assert m["ce_clean"] == pytest.approx(clean, rel=1e-4)
    assert m["ce_spliced"] == pytest.approx(sae, rel=1e-4)
    assert m["ce_zero"] == pytest.approx(zero, rel=1e-4)
    # the ratio of the measured parts (a near-zero denominator makes the hand ratio ill-conditioned)
    assert m["ce_recovered"] == pytest.approx((m["ce_zero"] - m["ce_spliced"]) / (m["ce_zero"] - m["ce_clean"]), rel=1e-9)
    if kind == "resid":
        assert m["ce_recovered"] == pytest.approx((zero - sae) / (zero - clean), rel=1e-3)


def test_training_tokens_are_every_position_but_bos(tiny_lm):
    tok, model = tiny_lm.tokenizer, tiny_lm.model
    chunks = chunks_of(tok, TEXTS)
    src = ActivationSource(HookedModel(model), tok, iter(chunks), [(Site("resid_pre", LAYER), None)], 2, "cpu",
                           torch.float32)
    x, t = src.next_tokens(10_000)
    want = torch.cat([hidden_states(model, torch.tensor([c]), torch.ones(1, len(c), dtype=torch.long))[LAYER][0, 1:]
                      for c in chunks])
    assert t is None and src.position == len(chunks)
    torch.testing.assert_close(x[:, 0], want, atol=1e-5, rtol=1e-5)


# ---- a short real training run: input scale, sparsity file ----------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "train_sae"))
    from sae_helpers import tiny_lm as make_lm

    import icl_cli.train_sae.trainer as trainer
    from icl_cli.store import Store
    from icl_cli.train_sae.config import TrainConfig
    from icl_cli.train_sae.run import train_sae_artifacts

    lm = make_lm()
    lm.dtype = torch.float32
    first = {}
    real = trainer.ShuffleBuffer._refill

    def spy(self):
        real(self)
        first.setdefault("x", self.x.clone())

    from icl_cli.dictionaries.standard import StandardSAE

    real_loss = StandardSAE.training_loss

    def loss_spy(self, x, target, coeff, dead=None):
        first.setdefault("inputs", []).append(x.detach().clone())
        return real_loss(self, x, target, coeff, dead)

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer.ShuffleBuffer, "_refill", spy)
    mp.setattr(StandardSAE, "training_loss", loss_spy)
    try:
        cfg = TrainConfig(model="tiny", dataset="tasks", width=64, batch_tokens=128, ctx=32, buffer_batches=4,
                          eval_tokens=256, lr=3e-3, layers=[1], arch="standard", tokens=20 * 128, checkpoint_every=0)
        store = Store(tmp_path_factory.mktemp("store"))
        (art,) = train_sae_artifacts(store, cfg, lm)
    finally:
        mp.undo()
    return store.resolve(art.key), art, first["x"], lm, first["inputs"]


def test_input_scale_is_sqrt_d_over_the_mean_norm_of_the_first_fill(trained):
    _, art, x0, lm, inputs = trained
    want = math.sqrt(lm.d_model) / float(x0[:, 0].float().norm(dim=-1).mean())
    assert art.metrics["input_scale"] == pytest.approx(want, rel=1e-5)
    # the dictionary trains on scaled inputs: the first two batches come from the first fill
    first = torch.cat(inputs[:2]).norm(dim=-1).mean()
    assert float(first) == pytest.approx(math.sqrt(lm.d_model), rel=0.15)


def test_sparsity_file_holds_log10_firing_frequency_of_the_last_fifth(trained):
    import h5py
    from safetensors.torch import load_file

    artifact, *_ = trained
    sp = load_file(str(artifact.path / "sparsity.safetensors"))["sparsity"]
    with h5py.File(artifact.path / "curves.h5") as f:
        steps, l0 = f["step"][()], f["l0"][()]
    total = int(steps[-1])
    assert total == 20 and len(steps) == total  # logged every step
    late = [float(v) for s, v in zip(steps, l0) if s - 1 >= int(0.8 * total)]
    assert (sp <= 0).all() and sp.shape == (64,)
    # Σ_f frequency_f = mean number of features firing per token over the late steps
    assert float((10.0 ** sp.double()).sum()) == pytest.approx(sum(late) / len(late), rel=1e-4)


# ---- resampling of dead features ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["standard", "gated"])
def test_resampling_points_dead_features_at_the_worst_reconstructed_input(arch):
    torch.manual_seed(0)
    d = build(DictConfig(d_in=8, d_sae=12, arch=arch))
    with torch.no_grad():
        d.W_enc.mul_(torch.rand(12) + 0.5)
        d.b_dec.copy_(0.1 * torch.randn(8))
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    x = 0.01 * torch.randn(40, 8)
    x[7] = 50 * torch.randn(8)  # by far the worst reconstructed input
    d(x).pow(2).sum().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    dead = torch.tensor([1, 4, 9])
    alive = torch.ones(12, dtype=torch.bool)
    alive[dead] = False
    st = _State(1, 12)
    st.fired_since_resample[0] = alive.clone()
    with torch.no_grad():
        direction = x[7] - d(x[7:8])[0]
    direction = direction / direction.norm()
    enc_norm = 0.2 * float(d.W_enc.detach().norm(dim=0)[alive].mean())

    _resample([d], opt, types.SimpleNamespace(x=x[:, None], t=None), st, torch.ones(1), torch.ones(1),
              [torch.Generator().manual_seed(0)])

    for i in dead.tolist():
        torch.testing.assert_close(d.W_dec[i].detach(), direction, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(d.W_enc[:, i].detach(), direction * enc_norm, atol=1e-5, rtol=1e-4)
    for name, p in d.named_parameters():
        if name == "b_dec":
            assert torch.equal(p.detach(), before[name])
            continue
        axis = 1 if name == "W_enc" else 0
        keep = p.detach().index_select(axis, alive.nonzero().flatten())
        assert torch.equal(keep, before[name].index_select(axis, alive.nonzero().flatten())), name
        if p.dim() == 1:  # biases (b_enc, b_gate, b_mag, r_mag) of resampled features restart at 0
            assert (p.detach()[dead] == 0).all(), name
        if not opt.state.get(p):
            continue  # no gradient reached it (the gate bias of a plain forward)
        m = opt.state[p]["exp_avg"].index_select(axis, dead)
        assert (m == 0).all() and (opt.state[p]["exp_avg_sq"].index_select(axis, dead) == 0).all(), name
        assert opt.state[p]["exp_avg"].index_select(axis, alive.nonzero().flatten()).abs().sum() > 0, name
    assert int(st.resampled[0]) == 3 and not st.fired_since_resample.any()
