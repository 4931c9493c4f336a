"""SPEC §9 training losses of every architecture, written out by hand on tiny tensors.

Each test builds a dictionary with non-trivial biases and decoder rows of unequal norms (so a
missing decoder-norm weight or bias shows), computes the loss and its gradients here with plain
torch, and compares with `training_loss`.
"""

from __future__ import annotations

import pytest
import torch

from icl_cli.dictionaries.base import DictConfig, build, input_scale
from icl_cli.dictionaries.jumprelu import BANDWIDTH
from icl_cli.dictionaries.topk import AUXK_COEFF

D_IN, D_SAE = 8, 24


def make(arch: str, seed: int = 0, k: int = 4, **kw):
    g = torch.Generator().manual_seed(seed)
    d = build(DictConfig(d_in=D_IN, d_sae=D_SAE, arch=arch, k=k, **kw))
    with torch.no_grad():
        d.W_dec.mul_(torch.rand(D_SAE, 1, generator=g) * 2 + 0.3)
        d.W_enc.add_(0.2 * torch.randn(d.W_enc.shape, generator=g))
        d.b_dec.copy_(0.3 * torch.randn(d.b_dec.shape, generator=g))
        if arch == "gated":
            d.b_gate.copy_(0.2 * torch.randn(D_SAE, generator=g))
            d.b_mag.copy_(0.2 * torch.randn(D_SAE, generator=g))
            d.r_mag.copy_(0.3 * torch.randn(D_SAE, generator=g))
        else:
            d.b_enc.copy_(0.2 * torch.randn(D_SAE, generator=g))
    return d


def grads(d, loss) -> dict[str, torch.Tensor]:
    d.zero_grad()
    loss.backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in d.named_parameters()}


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-4, msg=n)


def data(seed=1, n=16, d=D_IN):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


def sq(e):
    return e.pow(2).sum(-1).mean()


def test_standard_loss_weights_the_l1_by_decoder_norm():
    d = make("standard")
    x, coeff = data(), 0.7
    parts = d.training_loss(x, x, coeff)
    a = torch.relu((x - d.b_dec) @ d.W_enc + d.b_enc)
    recon = a @ d.W_dec + d.b_dec
    mse = sq(x - recon)
    l1 = sum(a[:, i] * d.W_dec[i].norm() for i in range(D_SAE)).mean()
    torch.testing.assert_close(parts.mse, mse)
    torch.testing.assert_close(parts.sparsity, l1)
    torch.testing.assert_close(parts.loss, mse + coeff * l1)
    torch.testing.assert_close(parts.recon, recon)
    assert torch.equal(parts.fired, a > 0)
    assert_same(grads(d, parts.loss), grads(d, mse + coeff * l1))


def test_transcoder_loss_reconstructs_the_target_without_input_centring():
    d = make("standard", site="transcoder", d_out=6)
    x, t = data(), data(2, d=6)
    parts = d.training_loss(x, t, 0.2)
    a = torch.relu(x @ d.W_enc + d.b_enc)
    torch.testing.assert_close(parts.mse, sq(t - (a @ d.W_dec + d.b_dec)))


def test_gated_loss_gate_sparsity_and_auxiliary_reconstruction():
    d = make("gated")
    x, coeff = data(), 0.4
    parts = d.training_loss(x, x, coeff)
    xc = x - d.b_dec
    pi = xc @ d.W_enc + d.b_gate
    mag = xc @ (d.W_enc * torch.exp(d.r_mag)) + d.b_mag
    a = (pi > 0).float() * torch.relu(mag)
    mse = sq(x - (a @ d.W_dec + d.b_dec))
    sparsity = (torch.relu(pi) * d.W_dec.norm(dim=1)).sum(-1).mean()
    aux = sq(x - (torch.relu(pi) @ d.W_dec.detach() + d.b_dec.detach()))
    total = mse + coeff * sparsity + aux
    torch.testing.assert_close(parts.mse, mse)
    torch.testing.assert_close(parts.sparsity, sparsity)
    torch.testing.assert_close(parts.aux, aux)
    torch.testing.assert_close(parts.loss, total)
    torch.testing.assert_close(parts.recon, a @ d.W_dec + d.b_dec)
    assert torch.equal(parts.fired, a > 0)
    # the auxiliary term trains the gate only: no gradient through W_dec or b_dec
    assert_same(grads(d, parts.loss), grads(d, total))


def hand_topk(d, x):
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    a = torch.zeros_like(pre)
    for b in range(x.shape[0]):  # top k per row, by a loop
        top = sorted(range(D_SAE), key=lambda i: -float(pre[b, i].detach()))[: d.cfg.k]
        for i in top:
            a[b, i] = torch.relu(pre[b, i])
    return pre, a


def test_topk_loss_and_auxk_on_dead_features():
    d = make("topk", k=4)
    x = data(n=12)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 5, 6, 9, 13, 20]] = True  # 6 dead > k_aux = d_in/2 = 4
    parts = d.training_loss(x, x, 0.0, dead)
    pre, a = hand_topk(d, x)
    recon = a @ d.W_dec + d.b_dec
    mse = sq(x - recon)
    e = (x - recon).detach()
    k_aux = D_IN // 2
    dead_idx = dead.nonzero().flatten().tolist()
    aux_acts = torch.zeros_like(pre)
    for b in range(x.shape[0]):
        top = sorted(dead_idx, key=lambda i: -float(pre[b, i].detach()))[:k_aux]
        for i in top:
            aux_acts[b, i] = torch.relu(pre[b, i])
    e_hat = aux_acts @ d.W_dec  # no decoder bias: it reconstructs an error
    aux = AUXK_COEFF * sq(e - e_hat)
    torch.testing.assert_close(parts.mse, mse)
    torch.testing.assert_close(parts.aux, aux)
    torch.testing.assert_close(parts.loss, mse + aux)
    torch.testing.assert_close(parts.recon, recon)
    assert torch.equal(parts.fired, a > 0)
    assert_same(grads(d, parts.loss), grads(d, mse + aux))


def test_topk_auxk_is_scaled_down_when_few_features_are_dead_and_absent_when_none():
    d = make("topk", k=4)
    x = data(n=10)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[3, 7]] = True  # 2 dead: all of them used, term scaled by 2 / (d_in/2)
    parts = d.training_loss(x, x, 0.0, dead)
    pre, a = hand_topk(d, x)
    e = x - (a @ d.W_dec + d.b_dec)
    e_hat = torch.relu(pre[:, [3, 7]]) @ d.W_dec[[3, 7]]
    torch.testing.assert_close(parts.aux, AUXK_COEFF * (2 / (D_IN // 2)) * sq(e - e_hat))
    assert float(d.training_loss(x, x, 0.0, torch.zeros(D_SAE, dtype=torch.bool)).aux) == 0.0


def test_jumprelu_forward_is_pre_times_step_plus_coeff_l0():
    d = make("jumprelu")
    with torch.no_grad():
        d.threshold.copy_(torch.rand(D_SAE) * 0.5 + 0.01)
    x, coeff = data(), 0.3
    parts = d.training_loss(x, x, coeff)
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    on = pre > d.threshold
    a = pre * on
    mse = sq(x - (a @ d.W_dec + d.b_dec))
    l0 = on.float().sum(-1).mean()
    torch.testing.assert_close(parts.mse, mse)
    torch.testing.assert_close(parts.sparsity, l0)
    torch.testing.assert_close(parts.loss, mse + coeff * l0)
    torch.testing.assert_close(parts.recon, a @ d.W_dec + d.b_dec)
    assert torch.equal(parts.fired, on) and float(parts.aux) == 0.0
    torch.testing.assert_close(d.activate(pre), torch.relu(pre) * on)


def test_jumprelu_pseudo_gradients_by_hand():
    d = make("jumprelu")
    x = data(n=32)
    pre = ((x - d.b_dec) @ d.W_enc + d.b_enc).detach()
    with torch.no_grad():  # put some pre-activations inside the kernel window of their threshold
        d.threshold.copy_((pre[0] - 0.2 * BANDWIDTH).clamp_min(1e-3))
    coeff = 0.5
    parts = d.training_loss(x, x, coeff)
    g = grads(d, parts.loss)
    theta = d.threshold.detach()
    on = (pre > theta).float()
    a = (pre * on).requires_grad_(True)
    recon = a @ d.W_dec.detach() + d.b_dec.detach()
    sq(x - recon).backward()
    g_a = a.grad  # ∂mse/∂a
    g_l0 = coeff / x.shape[0]  # ∂(coeff · mean_b l0_b)/∂l0_b
    near = ((pre - theta).abs() < BANDWIDTH / 2).float()
    want = -(near * (theta * g_a + g_l0)).sum(0) / BANDWIDTH  # −(1/ε)K·(θ·g_a + g_l0)
    assert near[0].sum() >= 5
    torch.testing.assert_close(g["threshold"], want, atol=1e-4, rtol=1e-4)
    # the pre-activation gradient passes only through the open gate
    g_pre = g_a * on
    torch.testing.assert_close(g["b_enc"], g_pre.sum(0), atol=1e-4, rtol=1e-4)


def test_jumprelu_threshold_gradients_estimate_the_derivative_of_the_expectation():
    """With pre ~ U(0, 1) for one feature: E[H(z−θ)] = 1 − θ and E[z·H(z−θ)] = (1 − θ²)/2, so the
    pseudo-gradients must estimate −1 and −θ (finite differences of the exact expectations)."""
    from icl_cli.dictionaries.jumprelu import _JumpReLUL0

    n, theta0 = 400_000, 0.6
    z = torch.rand(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = torch.tensor([theta0], dtype=torch.float64, requires_grad=True)
    a, l0 = _JumpReLUL0.apply(z, theta)
    (g_l0,) = torch.autograd.grad(l0.mean(), theta)
    a, _ = _JumpReLUL0.apply(z, theta)
    (g_a,) = torch.autograd.grad(a.mean(), theta)
    h = 1e-4
    fd_l0 = ((1 - (theta0 + h)) - (1 - (theta0 - h))) / (2 * h)
    fd_a = ((1 - (theta0 + h) ** 2) / 2 - (1 - (theta0 - h) ** 2) / 2) / (2 * h)
    assert float(g_l0) == pytest.approx(fd_l0, rel=0.1)
    assert float(g_a) == pytest.approx(fd_a, rel=0.1)


def test_after_step_keeps_unit_decoder_rows_and_positive_thresholds():
    for arch in ("topk", "jumprelu"):
        d = make(arch)
        with torch.no_grad():
            if arch == "jumprelu":
                d.threshold.fill_(-1.0)
        d.after_step()
        torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(D_SAE))
        if arch == "jumprelu":
            assert (d.threshold > 0).all()
    d = make("standard")
    before = d.W_dec.detach().clone()
    d.after_step()
    assert torch.equal(d.W_dec.detach(), before)  # the L1 is weighted by the norm instead


@pytest.mark.parametrize("size", [9.0, 0.05])
def test_input_scale_gives_mean_norm_sqrt_d(size):
    x = torch.randn(100, 16) * torch.rand(100, 1) * size
    n = input_scale(float(x.norm(dim=1).mean()), 16)
    assert float((x * n).norm(dim=1).mean()) == pytest.approx(16 ** 0.5, rel=1e-5)


@pytest.mark.parametrize("arch", ["standard", "gated", "topk", "jumprelu"])
def test_folding_the_scale_reproduces_the_training_space_dictionary(arch):
    d = make(arch)
    if arch == "jumprelu":
        with torch.no_grad():
            d.threshold.copy_(torch.rand(D_SAE) * 0.3)
    x = data(3, n=20) * 11
    n = 0.23
    want_acts = d.encode(x * n)
    want = (d.encode(x * n) @ d.W_dec + d.b_dec) / n  # trained on x·n, mapped back to model space
    d.fold_normalisation(n, n)
    torch.testing.assert_close(d.encode(x), want_acts, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d(x), want, atol=1e-4, rtol=1e-4)


def test_gated_training_gate_is_strict_like_encode():
    """π = 0 exactly (input = b_dec, zero gate bias) is off, in training as in encode."""
    d = make("gated")
    with torch.no_grad():
        d.b_gate[:6] = 0.0
        d.b_mag[:6] = 0.5  # the magnitude path alone would fire
    x = torch.cat([d.b_dec.detach()[None], data(n=4)])
    parts = d.training_loss(x, x, 0.1)
    assert not parts.fired[0, :6].any()
    assert torch.equal(parts.fired, d.encode(x) > 0)
