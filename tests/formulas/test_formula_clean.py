"""SPEC §5 cleaning against independent computations.

The optimiser is replaced by a recorder (it keeps every θ and every gradient the cleaning loop
produces and then applies a scripted update), so the loss gradient, the early stopping rule and
the returned θ can each be checked against a computation written here: a full Hugging Face pass
with the vector added by a pre-hook, the NLL summed by hand, L0 schedules chosen in advance.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from icl_cli.clean.cleaning import CleanParams, clean_task, clean_vector, steer_mask
from icl_cli.collect.vectors import task_split
from icl_cli.core.batch import encode_prompts
from icl_cli.core.prompts import DUMMY_PAIR, Prompt, sample_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.steering import BaseCache
from icl_cli.core.tasks import load_task
from icl_cli.dictionaries.base import DictConfig, build
from tests.formulas._reference import blocks, logits_with_added, pad, summed_nll, word_tokens

LAYER = 1
D = 32


class Recorder(torch.optim.Optimizer):
    """Stands in for Adam: records θ and ∂loss/∂θ at each step, then sets θ to the next scripted
    value (or takes a plain gradient step when the script has run out)."""

    script: list[torch.Tensor] = []
    thetas: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        Recorder.thetas, Recorder.grads = [], []

    @torch.no_grad()
    def step(self, closure=None):
        (theta,) = self.param_groups[0]["params"]
        Recorder.thetas.append(theta.detach().clone())
        Recorder.grads.append(theta.grad.detach().clone())
        i = len(Recorder.grads) - 1
        if i < len(Recorder.script):
            theta.copy_(Recorder.script[i])
        else:
            theta.sub_(self.param_groups[0]["lr"] * theta.grad)


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(torch.optim, "Adam", Recorder)
    Recorder.script = []
    return Recorder


def sae_with_biases(arch: str, d_sae: int = 48, seed: int = 0, k: int = 10):
    """A random dictionary whose biases, gate and decoder norms all differ from the defaults."""
    g = torch.Generator().manual_seed(seed)
    sae = build(DictConfig(d_in=D, d_sae=d_sae, arch=arch, site="resid_pre", layer=LAYER, k=k))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(d_sae, 1, generator=g) + 0.5)
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=g))
        if arch == "gated":
            sae.b_gate.copy_(0.2 * torch.randn(d_sae, generator=g))
            sae.b_mag.copy_(0.2 * torch.randn(d_sae, generator=g))
            sae.r_mag.copy_(0.3 * torch.randn(d_sae, generator=g))
        else:
            sae.b_enc.copy_(0.2 * torch.randn(d_sae, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(0.3 * torch.rand(d_sae, generator=g))
    return sae


def hand_pre(sae, v):
    """θ₀ = the SAE's pre-activation of v, written out per architecture."""
    x = v - sae.b_dec
    if sae.cfg.arch == "gated":
        return x @ (sae.W_enc * torch.exp(sae.r_mag)) + sae.b_mag
    return x @ sae.W_enc + sae.b_enc


def hand_act(sae, theta):
    """a(θ): ReLU (standard, and top-k during cleaning), JumpReLU, or the gate's threshold."""
    arch = sae.cfg.arch
    if arch in ("standard", "topk"):
        return torch.relu(theta)
    if arch == "jumprelu":
        return torch.relu(theta) * (theta > sae.threshold)
    thr = sae.b_mag - torch.exp(sae.r_mag) * sae.b_gate  # relu(π) > 0 ⇔ magnitude pre > this
    return torch.relu(theta) * (theta > thr)


@pytest.fixture(scope="module")
def env(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    task = load_task("antonyms")
    g = torch.Generator().manual_seed(3)
    v = 2.0 * torch.randn(D, generator=g)
    return hm, task, v


def positions(tokenizer, prompts, detectors: bool):
    """Per prompt: where the vector goes (query arrow, or the dummy's output token) and the
    (logit position, token) of the query answer, found from the token strings."""
    rows, where, targets = [], [], []
    for p in prompts:
        toks = word_tokens(tokenizer, p.text)
        ids = tokenizer(p.text)["input_ids"]
        arrow = max(i for i, t in enumerate(toks) if t == "->")
        where.append(toks.index(DUMMY_PAIR[1]) if detectors else arrow)
        targets.append([(arrow, ids[arrow + 1])])  # toy words are single tokens: one answer token
        rows.append(ids)
    return rows, where, targets


def reference_loss(model, tokenizer, prompts, sae, theta, lam, detectors=False):
    rows, where, targets = positions(tokenizer, prompts, detectors)
    ids, mask = pad(rows, tokenizer.pad_token_id)
    a = hand_act(sae, theta)
    vec = a @ sae.W_dec + sae.b_dec
    logits = logits_with_added(model, ids, mask, LAYER, vec, where)
    return summed_nll(logits, targets) + lam * a.abs().sum()


@pytest.mark.parametrize("arch,detectors", [("standard", False), ("gated", False), ("jumprelu", True)])
def test_cleaning_gradient_is_that_of_nll_plus_l1_on_the_activations(tiny_lm, env, recorder, arch, detectors):
    hm, task, v = env
    sae = sae_with_biases(arch)
    base = sample_prompts(task.pairs, 5, 0, seed=2)
    prompts = [Prompt([DUMMY_PAIR], p.query) for p in base] if detectors else base
    cache = BaseCache.build(hm, tiny_lm.tokenizer, prompts, [LAYER])
    lam = 0.3
    clean_vector(hm, sae, cache, LAYER, v, CleanParams(max_steps=2, patience=5, lr=1e-3), lam,
                 steer_mask(cache.batch, detectors))
    theta0 = recorder.thetas[0]
    torch.testing.assert_close(theta0, hand_pre(sae, v).detach(), atol=1e-5, rtol=1e-5)
    for theta, grad in zip(recorder.thetas, recorder.grads):
        th = theta.clone().requires_grad_(True)
        reference_loss(tiny_lm.model, tiny_lm.tokenizer, prompts, sae, th, lam, detectors).backward()
        torch.testing.assert_close(grad, th.grad, atol=2e-5, rtol=1e-4)
        assert (grad.abs() > 1e-6).sum() >= 3


def test_detector_mask_is_the_dummy_examples_output_token(tiny_lm, env):
    hm, task, _ = env
    prompts = [Prompt([DUMMY_PAIR], p.query) for p in sample_prompts(task.pairs, 3, 0, seed=1)]
    batch = encode_prompts(tiny_lm.tokenizer, prompts)
    _, where, targets = positions(tiny_lm.tokenizer, prompts, True)
    want = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for b, w in enumerate(where):
        want[b, w] = True
    assert torch.equal(steer_mask(batch, True), want)
    arrows = torch.zeros_like(want)
    for b, t in enumerate(targets):
        arrows[b, t[0][0]] = True
    assert torch.equal(steer_mask(batch, False), arrows)


def test_each_step_runs_only_the_blocks_from_the_layer_on(tiny_lm, env, recorder):
    hm, task, v = env
    sae = sae_with_biases("standard")
    cache = BaseCache.build(hm, tiny_lm.tokenizer, sample_prompts(task.pairs, 3, 0, seed=2), [LAYER])
    calls = [0] * len(blocks(tiny_lm.model))
    hooks = [b.self_attn.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(blocks(tiny_lm.model))]
    try:
        out = clean_vector(hm, sae, cache, LAYER, v, CleanParams(max_steps=3, patience=10, lr=1e-3), 0.1,
                           steer_mask(cache.batch, False))
    finally:
        for h in hooks:
            h.remove()
    assert out.steps == 3
    assert calls[:LAYER] == [0] * LAYER  # the residual below the layer came from the cache
    assert all(c == 3 for c in calls[LAYER:])


def scripted_thetas(theta0: torch.Tensor, l0s: list[int], seed: int = 0) -> list[torch.Tensor]:
    """θ's whose ReLU has exactly the given L0s, each with different values."""
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(theta0, descending=True)
    out = []
    for n in l0s:
        th = -torch.rand(theta0.shape, generator=g) - 0.1
        th[order[:n]] = torch.rand(n, generator=g) + 0.1
        out.append(th)
    return out


def test_early_stopping_counts_steps_without_a_new_l0_minimum_and_returns_that_theta(tiny_lm, env, recorder):
    hm, task, v = env
    sae = sae_with_biases("standard")
    cache = BaseCache.build(hm, tiny_lm.tokenizer, sample_prompts(task.pairs, 3, 0, seed=2), [LAYER])
    n0 = int((hand_pre(sae, v) > 0).sum())
    assert n0 >= 10
    # steps 1..: new min, tie, new min (best), worse, tie, tie -> patience 3 runs out at step 6
    l0s = [n0 - 1, n0 - 1, n0 - 3, n0 - 2, n0 - 3, n0 - 3] + [n0 - 6] * 20
    recorder.script = scripted_thetas(hand_pre(sae, v).detach(), l0s)
    out = clean_vector(hm, sae, cache, LAYER, v, CleanParams(max_steps=20, patience=3), 0.05, steer_mask(cache.batch, False))
    assert out.steps == 6 and len(recorder.grads) == 6
    assert out.l0 == n0 - 3
    best = torch.relu(recorder.script[2])  # the first θ that reached the minimum
    torch.testing.assert_close(out.acts, best)
    torch.testing.assert_close(out.vector, best @ sae.W_dec + sae.b_dec)


def test_without_a_new_minimum_it_stops_after_patience_steps_and_keeps_the_start(tiny_lm, env, recorder):
    hm, task, v = env
    sae = sae_with_biases("gated")
    cache = BaseCache.build(hm, tiny_lm.tokenizer, sample_prompts(task.pairs, 3, 0, seed=2), [LAYER])
    theta0 = hand_pre(sae, v).detach()
    recorder.script = [theta0 * (1.0 + 0.01 * i) for i in range(1, 30)]  # moves, but L0 never drops
    out = clean_vector(hm, sae, cache, LAYER, v, CleanParams(max_steps=30, patience=4), 0.05, steer_mask(cache.batch, False))
    assert out.steps == 4
    a0 = hand_act(sae, theta0)
    torch.testing.assert_close(out.acts, a0)
    torch.testing.assert_close(out.vector, a0 @ sae.W_dec + sae.b_dec)
    assert out.l0 == int((a0 > 0).sum())


def test_it_stops_at_max_steps_while_l0_keeps_falling(tiny_lm, env, recorder):
    hm, task, v = env
    sae = sae_with_biases("standard")
    cache = BaseCache.build(hm, tiny_lm.tokenizer, sample_prompts(task.pairs, 3, 0, seed=2), [LAYER])
    n0 = int((hand_pre(sae, v) > 0).sum())
    recorder.script = scripted_thetas(hand_pre(sae, v).detach(), [n0 - 1 - i for i in range(5)])
    out = clean_vector(hm, sae, cache, LAYER, v, CleanParams(max_steps=5, patience=1), 0.05, steer_mask(cache.batch, False))
    assert out.steps == 5 and out.l0 == n0 - 5
    torch.testing.assert_close(out.acts, torch.relu(recorder.script[4]))


def test_topk_cleaning_starts_from_the_reconstruction_code_and_uses_relu(tiny_lm, env, recorder):
    hm, task, v = env
    sae = sae_with_biases("topk", k=6)
    cache = BaseCache.build(hm, tiny_lm.tokenizer, sample_prompts(task.pairs, 3, 0, seed=2), [LAYER])
    pre = hand_pre(sae, v).detach()
    top = torch.argsort(pre, descending=True)[:6]
    out = clean_vector(hm, sae, cache, LAYER, v, CleanParams(max_steps=2, patience=5, lr=1e-4), 0.0,
                       steer_mask(cache.batch, False))
    theta0 = recorder.thetas[0]
    outside = torch.ones_like(pre, dtype=torch.bool)
    outside[top] = False
    torch.testing.assert_close(theta0[top], pre[top])
    assert (theta0[outside] <= 0).all()
    torch.testing.assert_close(theta0[outside], pre[outside].clamp(max=0))
    assert out.l0 <= 6


# ---- behaviour that the formulas imply ------------------------------------------------------------
def train_nll(hm, cache, vec):
    from icl_cli.core.steering import steered_logits
    from icl_cli.core.metrics import nll

    with torch.no_grad():
        return float(nll(steered_logits(hm, cache, LAYER, vec), cache.batch))


def test_lambda_zero_does_not_end_above_the_reconstruction_training_loss(tiny_lm, env):
    hm, task, v = env
    sae = sae_with_biases("standard", seed=1)
    cache = BaseCache.build(hm, tiny_lm.tokenizer, sample_prompts(task.pairs, 6, 0, seed=4), [LAYER])
    out = clean_vector(hm, sae, cache, LAYER, v, CleanParams(max_steps=40, patience=40, lr=0.02), 0.0,
                       steer_mask(cache.batch, False))
    recon = torch.relu(hand_pre(sae, v)) @ sae.W_dec + sae.b_dec
    assert train_nll(hm, cache, out.vector) <= train_nll(hm, cache, recon.detach()) + 1e-4


def test_large_lambda_reaches_l0_at_most_one(tiny_lm, env):
    hm, task, v = env
    sae = sae_with_biases("standard", seed=2)
    cache = BaseCache.build(hm, tiny_lm.tokenizer, sample_prompts(task.pairs, 3, 0, seed=4), [LAYER])
    out = clean_vector(hm, sae, cache, LAYER, v, CleanParams(max_steps=150, patience=150, lr=0.05), 50.0,
                       steer_mask(cache.batch, False))
    assert out.l0 <= 1 and int((out.acts > 0).sum()) == out.l0


def test_a_vector_orthogonal_to_every_decoder_row_cleans_to_nothing(tiny_lm, env):
    hm, task, _ = env
    q = torch.eye(D)[torch.randperm(D, generator=torch.Generator().manual_seed(0))]  # exactly orthonormal rows
    sae = build(DictConfig(d_in=D, d_sae=12, arch="standard", site="resid_pre", layer=LAYER))
    with torch.no_grad():
        sae.W_dec.copy_(q[:12] * 1.5)  # rows span the first 12 directions
        sae.W_enc.copy_(q[:12].T)
    v = 3.0 * q[20] - 1.0 * q[25]
    cp = CleanParams(max_steps=5, patience=5)
    res = clean_task(hm, tiny_lm.tokenizer, sae, task, LAYER, v, cp, (6, 0))
    assert res.features == [] and res.l0["cleaned"] == 0 and res.l0["recon"] == 0
    assert res.l0["ito_5"] == 0 and res.l0["ito_20"] == 0


def test_stored_l0_and_steps_are_those_of_the_returned_theta(tiny_lm, env, recorder):
    hm, task, v = env
    sae = sae_with_biases("standard")
    n0 = int((hand_pre(sae, v) > 0).sum())
    recorder.script = scripted_thetas(hand_pre(sae, v).detach(), [n0 - 2, n0 - 4, n0 - 3, n0 - 3, n0 - 3, n0 - 1])
    res = clean_task(hm, tiny_lm.tokenizer, sae, task, LAYER, v, CleanParams(max_steps=20, patience=3, ito_k=()), (6, 0))
    assert res.steps == 5 and res.l0["cleaned"] == n0 - 4 == len(res.features)
    kept = torch.relu(recorder.script[1])
    assert sorted(res.features) == torch.nonzero(kept > 0).flatten().tolist()
    torch.testing.assert_close(torch.tensor(res.weights), kept[res.features])


# ---- the split: training prompts never use held-out pairs ----------------------------------------
def test_cleaning_trains_on_train_pairs_and_scores_the_held_out_queries(tiny_lm, env, monkeypatch):
    hm, task, v = env
    import icl_cli.clean.cleaning as clean_mod

    seen = []
    real = clean_mod.BaseCache.build

    def spy(hm_, tok, prompts, *a, **k):
        seen.append(list(prompts))
        return real(hm_, tok, prompts, *a, **k)

    monkeypatch.setattr(clean_mod.BaseCache, "build", spy)
    task = dataclasses.replace(task, pairs=task.pairs[:16])  # 16 queries cycle through every allowed pair
    split = (6, 0)
    train, held = task_split(task, *split)
    assert len(held) == 4
    res = clean_task(hm, tiny_lm.tokenizer, sae_with_biases("standard"), task, LAYER, v,
                     CleanParams(max_steps=2, patience=2, n_train=16, ito_k=()), split)
    assert res.steps >= 1
    train_prompts, held_prompts = seen[0], seen[-1]
    assert len(train_prompts) == 16
    for p in train_prompts:
        assert all(pair not in held for pair in p.pairs)
    assert {p.query for p in held_prompts} == set(held)


def test_cleaning_a_topk_sae_uses_relu_not_its_top_k():
    from icl_cli.clean.cleaning import activation

    sae = sae_with_biases("topk", k=3)
    theta = torch.randn(48, generator=torch.Generator().manual_seed(0))
    assert int((theta > 0).sum()) > 3
    assert torch.equal(activation(sae)(theta), torch.relu(theta))
    gated = sae_with_biases("gated")
    torch.testing.assert_close(activation(gated)(theta), hand_act(gated, theta))
