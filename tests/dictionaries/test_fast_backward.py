"""The hand-written backward passes of SAE training (icl_cli/dictionaries/sparse_train.py) against
autograd of the plain dense formulas written here.

Both forms of the codes are checked: sparse (only entries that can be active, used once a
dictionary is trained) and dense (a fresh dictionary). `SPARSE_MAX_DENSITY` is patched to force
one or the other on tiny shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from icl_cli.dictionaries import sparse_train
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.dictionaries.jumprelu import BANDWIDTH

D_IN, D_SAE, B = 8, 32, 24
PATHS = {"sparse": 1.0, "dense": -1.0}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    monkeypatch.setattr(sparse_train, "SPARSE_MAX_DENSITY", PATHS[request.param])
    return request.param


# ---- the plain formulas (SPEC §9), dense, plain autograd ------------------------------------------
class _Step(torch.autograd.Function):
    """H(z − θ) with the rectangle-kernel pseudo-gradient ∂/∂θ = −(1/ε)·K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx, z, theta):
        ctx.save_for_backward(z, theta)
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        k = ((z - theta).abs() < BANDWIDTH / 2).to(z.dtype)
        return None, (-(k / BANDWIDTH) * g).sum(0)


class _ZStep(torch.autograd.Function):
    """z·H(z − θ): ∂/∂z = H, ∂/∂θ = −(θ/ε)·K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx, z, theta):
        ctx.save_for_backward(z, theta)
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        k = ((z - theta).abs() < BANDWIDTH / 2).to(z.dtype)
        return g * (z > theta).to(z.dtype), (-(theta * k / BANDWIDTH) * g).sum(0)


def plain_loss(d, x, coeff):
    """(loss, mse, sparsity, aux, fired, recon) of d on x, straight from the formulas."""
    xc = x - d.b_dec
    sq = lambda e: e.pow(2).sum(-1).mean()  # noqa: E731
    norms = d.W_dec.norm(dim=1)
    if d.arch == "standard":
        a = torch.relu(xc @ d.W_enc + d.b_enc)
        recon = a @ d.W_dec + d.b_dec
        sparsity = (a * norms).sum(-1).mean()
        aux = torch.zeros(())
        loss = sq(x - recon) + coeff * sparsity
    elif d.arch == "gated":
        pi = xc @ d.W_enc + d.b_gate
        a = (pi > 0).float() * torch.relu(xc @ (d.W_enc * torch.exp(d.r_mag)) + d.b_mag)
        recon = a @ d.W_dec + d.b_dec
        sparsity = (torch.relu(pi) * norms).sum(-1).mean()
        aux = sq(x - (torch.relu(pi) @ d.W_dec.detach() + d.b_dec.detach()))
        loss = sq(x - recon) + coeff * sparsity + aux
    elif d.arch == "topk":  # no dead features: no AuxK
        pre = xc @ d.W_enc + d.b_enc
        vals, idx = pre.topk(d.cfg.k, dim=-1)
        a = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        recon = a @ d.W_dec + d.b_dec
        sparsity = aux = torch.zeros(())
        loss = sq(x - recon)
    else:
        pre = xc @ d.W_enc + d.b_enc
        a = _ZStep.apply(pre, d.threshold)
        recon = a @ d.W_dec + d.b_dec
        sparsity = _Step.apply(pre, d.threshold).sum(-1).mean()
        aux = torch.zeros(())
        loss = sq(x - recon) + coeff * sparsity
    return loss, sq(x - recon), sparsity, aux, a > 0, recon


def make(arch, seed=0):
    """A dictionary with unequal decoder norms and biases that leave ~1/4 of the features on."""
    g = torch.Generator().manual_seed(seed)
    d = build(DictConfig(d_in=D_IN, d_sae=D_SAE, arch=arch, k=5))
    x = torch.randn(B, D_IN, generator=g) * 2
    with torch.no_grad():
        d.W_dec.mul_(torch.rand(D_SAE, 1, generator=g) * 2 + 0.3)
        d.W_enc.add_(0.2 * torch.randn(d.W_enc.shape, generator=g))
        d.b_dec.copy_(0.3 * torch.randn(D_IN, generator=g))
        proj = (x - d.b_dec) @ d.W_enc
        cut = proj.quantile(0.75, dim=0)
        if arch == "gated":
            d.b_gate.copy_(-cut)
            d.b_mag.copy_(0.2 * torch.randn(D_SAE, generator=g))
            d.r_mag.copy_(0.3 * torch.randn(D_SAE, generator=g))
        elif arch in ("standard", "topk"):
            d.b_enc.copy_(-cut + 0.01 * torch.randn(D_SAE, generator=g))
        else:
            d.b_enc.copy_(10 + 0.1 * torch.randn(D_SAE, generator=g))  # pre > 0: thresholds fit anywhere
            pre = proj + d.b_enc
            d.threshold.copy_((cut + d.b_enc).clamp_min(1e-3))
            # entries inside the kernel window, on both sides of the threshold
            d.threshold[:6] = pre[0, :6] - 0.2 * BANDWIDTH
            d.threshold[6:12] = pre[1, 6:12] + 0.2 * BANDWIDTH
            d.threshold.clamp_(min=1e-4)
    return d, x


def grads_of(d, loss):
    d.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in d.named_parameters()}


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu"])
def test_training_loss_and_gradients_equal_plain_autograd(arch, path):
    d, x = make(arch)
    coeff = 0.7
    parts = d.training_loss(x, x, coeff)
    got = grads_of(d, parts.loss)
    want_parts = plain_loss(d, x, coeff)
    want = grads_of(d, want_parts[0])
    for name, a, b in zip(("loss", "mse", "sparsity", "aux"), parts[:4], want_parts[:4]):
        torch.testing.assert_close(a, b, msg=name)
    assert torch.equal(parts.fired, want_parts[4])
    assert 0.1 < parts.fired.float().mean() < 0.5  # neither empty nor dense
    torch.testing.assert_close(parts.recon, want_parts[5])
    assert set(got) == set(want)
    for n in want:
        assert want[n].abs().max() > 0 or n == "threshold", n
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)
    if arch == "jumprelu":
        assert want["threshold"][:12].abs().min() > 0  # the kernel window was exercised


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk"])
def test_one_adam_step_equals_the_plain_autograd_step(arch, path):
    from icl_cli.train_sae.trainer import make_optimizer

    fast, x = make(arch, seed=3)
    plain = copy.deepcopy(fast)
    opt_f = make_optimizer(list(fast.parameters()), lr=1e-2)
    opt_p = torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=False)
    fast.training_loss(x, x, 0.5).loss.backward()
    plain_loss(plain, x, 0.5)[0].backward()
    for d, opt in ((fast, opt_f), (plain, opt_p)):
        opt.step()
        d.after_step()
    for (n, p), q in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def _stable_threshold(proj, b_enc, n_on=3):
    """Per-feature thresholds between the n_on-th and next largest value of proj + b_enc, so a
    gradcheck perturbation cannot flip an entry in or out of the active set."""
    top = (proj + b_enc).sort(dim=0, descending=True).values
    thr = (top[n_on - 1] + top[n_on]) / 2
    margin = ((proj + b_enc) - thr).abs().min()
    assert margin > 1e-4
    return thr


@pytest.mark.parametrize("bias", [True, False])
def test_encode_decode_gradcheck_float64(path, bias):
    g = torch.Generator().manual_seed(5)
    n, d_in, n_feat, d_out = 7, 4, 9, 5
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, b_in, W_enc, W_dec = mk(n, d_in), mk(d_in), mk(d_in, n_feat), mk(n_feat, d_out)
    b_enc = mk(n_feat) if bias else None
    zero = torch.zeros(n_feat, dtype=torch.float64)
    with torch.no_grad():
        thr = _stable_threshold((x - b_in) @ W_enc, b_enc if bias else zero)

    def fast(x, b_in, W_enc, W_dec, *b):
        be = b[0] if b else None
        c = sparse_train.encode(x, b_in, W_enc, be, thr)
        a = c.pre if c.pattern is not None else c.pre * (c.pre > thr)
        return c.decode(a * c.feature(torch.arange(n_feat, dtype=torch.float64) + 1), W_dec, torch.zeros(d_out, dtype=torch.float64))

    inputs = (x, b_in, W_enc, W_dec) + ((b_enc,) if bias else ())
    assert torch.autograd.gradcheck(fast, inputs)
    # and the forward is the plain formula
    pre = (x - b_in) @ W_enc + (b_enc if bias else 0)
    want = (pre * (pre > thr) * (torch.arange(n_feat) + 1)) @ W_dec
    torch.testing.assert_close(fast(*inputs), want)


def test_sparse_form_is_chosen_for_a_trained_like_density_and_dense_for_a_fresh_one():
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(64, 16, generator=g), torch.randn(16, 256, generator=g)
    b = torch.zeros(256)
    assert sparse_train.encode(x, None, W, b, 0.0).pattern is None  # half fire
    c = sparse_train.encode(x, None, W, b, 10.0)  # pre ~ N(0, 16): ~0.6% fire
    assert c.pattern is not None and 0 < len(c.pre) < 0.06 * 64 * 256


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu"])
def test_bfloat16_autocast_gives_float32_gradients_close_to_float32(arch):
    """train-sae runs under bfloat16 autocast on GPUs; the dense form must accept bf16 codes."""
    d, x = make(arch, seed=4)
    want = grads_of(d, d.training_loss(x, x, 0.5).loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = d.training_loss(x, x, 0.5).loss
    got = grads_of(d, loss)
    for n in want:
        assert got[n].dtype == torch.float32 and torch.isfinite(got[n]).all()
        if arch == "jumprelu":  # entries planted within 0.2ε of θ: bfloat16 rounding flips them
            continue
        scale = want[n].abs().max().clamp_min(1e-3)
        assert ((got[n] - want[n]).abs().max() / scale) < 0.15, n
