"""Gradient pursuit (SPEC §5) against a literal loop, and activation mass by role (SPEC §8)
against a per-token loop over Hugging Face hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_cli.collect.vectors import mass_percent, role_mass
from icl_cli.core.batch import encode_prompts
from icl_cli.core.prompts import ROLES, sample_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import load_task
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.clean.pursuit import gradient_pursuit, pursuit_vector
from tests.formulas._reference import hidden_states


def literal_pursuit(x: np.ndarray, atoms: np.ndarray, k: int) -> np.ndarray:
    """SPEC §5 step by step, with Python loops over atoms."""
    n = atoms.shape[0]
    w = np.zeros(n)
    support: list[int] = []
    for _ in range(k):
        r = x - sum(w[i] * atoms[i] for i in range(n))
        scores = [float(atoms[i] @ r) for i in range(n)]
        best = max(range(n), key=lambda i: scores[i])
        if best not in support:
            support.append(best)
        g = np.zeros(n)
        for i in support:
            g[i] = atoms[i] @ r
        c = sum(g[i] * atoms[i] for i in support)
        cc = float(c @ c)
        if cc <= 0:
            break
        eta = float(c @ r) / cc
        w = np.maximum(0.0, w + eta * g)
    return w


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 3), (2, 5), (3, 8)])
def test_gradient_pursuit_equals_the_literal_algorithm(seed, k):
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(20, 10))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    x = rng.normal(size=10) + atoms[3] * 2
    want = literal_pursuit(x, atoms, k)
    got = gradient_pursuit(torch.from_numpy(x), torch.from_numpy(atoms), k).numpy()
    np.testing.assert_allclose(got, want, atol=1e-10)
    assert (got >= 0).all() and (got > 0).sum() <= k


def test_a_target_orthogonal_to_every_atom_gets_no_weight():
    atoms = torch.eye(6, dtype=torch.float64)[:4]
    w = gradient_pursuit(torch.tensor([0, 0, 0, 0, 2.0, -1.0], dtype=torch.float64), atoms, 3)
    assert torch.equal(w, torch.zeros(4, dtype=torch.float64))


def test_pursuit_vector_decomposes_around_the_decoder_bias_with_unit_directions():
    torch.manual_seed(0)
    sae = build(DictConfig(d_in=10, d_sae=20, arch="standard"))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(20, 1) * 3 + 0.2)  # decoder rows of very different norms
        sae.b_dec.copy_(torch.randn(10))
    v = (torch.randn(10) + 2 * sae.W_dec[4]).detach()
    W = sae.W_dec.detach().double().numpy()
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    b = sae.b_dec.detach().double().numpy()
    for k in (2, 5):
        w = literal_pursuit(v.double().numpy() - b, unit, k)
        vec, l0 = pursuit_vector(v, sae, k)
        np.testing.assert_allclose(vec.double().numpy(), b + w @ unit, atol=1e-5)
        assert l0 == int((w > 0).sum())
        assert vec.dtype == v.dtype


@pytest.fixture(scope="module")
def mass_setup(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    prompts = sample_prompts(load_task("antonyms").pairs, 5, 3, seed=0)
    torch.manual_seed(0)
    sae = build(DictConfig(d_in=32, d_sae=40, arch="standard", site="resid_pre", layer=2))
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # every token fires: the BOS token carries a lot of mass if counted
        sae.b_dec.copy_(0.1 * torch.randn(32))
    return hm, prompts, sae


def test_role_mass_sums_activations_per_role_without_bos_or_padding(tiny_lm, mass_setup):
    hm, prompts, sae = mass_setup
    tok = tiny_lm.tokenizer
    want = torch.zeros(1 + len(ROLES), 40)
    for p in prompts:  # one prompt at a time, no padding, through HF's hidden states
        ids = torch.tensor([tok(p.text)["input_ids"]])
        x = hidden_states(tiny_lm.model, ids, torch.ones_like(ids))[2][0]  # [P, D] resid_pre[2]
        a = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        roles = encode_prompts(tok, [p]).roles[0]
        for t in range(ids.shape[1]):
            if ids[0, t] == tok.bos_token_id:
                continue
            want[int(roles[t])] += a[t].detach()
    got = role_mass(hm, tok, prompts, sae, batch_size=2)  # batches of unequal lengths: padding
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_mass_percent_is_each_roles_share_of_the_chosen_features():
    mass = torch.tensor([[1.0, 0.0, 3.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0], [7.0, 1.0, 0.0],
                         [0.0, 5.0, 0.0], [0.0, 0.0, 6.0]])
    got = mass_percent(mass, [0, 2])
    total = 1 + 3 + 2 + 1 + 7 + 6
    want = {"none": 4, "prompt": 2, "input": 1, "arrow": 7, "output": 0, "newline": 6}
    assert got == pytest.approx({r: 100 * v / total for r, v in want.items()})
    assert sum(mass_percent(mass).values()) == pytest.approx(100)
