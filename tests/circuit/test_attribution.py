"""Node IEs against the effects of actually ablating each node (ground truth by intervention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from icl_cli.circuit.attribution import node_scores
from icl_cli.core.sites import HookedModel
from tests.circuit.helpers import role_index, run_with_site_edit, tiny_suite, tiny_toy64, toy_batch


@pytest.fixture(scope="module")
def setup(tiny_toy_dir):
    torch.manual_seed(0)
    lm = tiny_toy64(tiny_toy_dir)
    hm = HookedModel(lm.model)
    dicts = tiny_suite(lm.d_model, range(lm.n_layers), d_sae=24, dtype=torch.float64, seed=3)
    batch = toy_batch(lm, n_prompts=3, n_shot=4)
    return lm, hm, dicts, batch


def m64(logits, batch) -> torch.Tensor:
    """all_pairs_logprob in float64, written here: mean over prompts of the mean log-prob of each
    pair's first answer token, the first pair excluded."""
    lp = torch.log_softmax(logits.double(), -1)
    per_prompt = []
    for b in range(len(batch)):
        vals = [lp[b, p, t] for p, t in zip(batch.pair_answer_pos[b, 1:].tolist(), batch.pair_answer_ids[b, 1:].tolist())
                if p >= 0]
        per_prompt.append(torch.stack(vals).mean())
    return torch.stack(per_prompt).mean()


def actual_effect(hm, batch, dicts, key, g, f, base: torch.Tensor) -> float:
    """m(M) − m(node ablated): feature f set to base [B,P] at the tokens of group g, error kept."""
    d = dicts[key]
    mask = role_index(batch) == g

    def write(x_in, x_out):
        a = d.encode(x_in)
        e = x_out - d.decode(a)
        a = a.clone()
        a[..., f] = torch.where(mask, base, a[..., f])
        return d.decode(a) + e

    m_full = m64(hm.run(batch.input_ids, batch.attention_mask).logits, batch)
    return float(m_full - m64(run_with_site_edit(hm, batch, key, write), batch))


def _nodes(s, n: int):
    flat = [(float(s.ie[k][g, f]), k, g, f) for k in s.keys for g, f in torch.nonzero(s.ie[k]).tolist()]
    flat.sort(key=lambda t: -abs(t[0]))
    return [(k, g, f) for _, k, g, f in flat[:n]]


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_ie_ranks_like_actual_ablation_and_ig_is_closer(setup, baseline):
    lm, hm, dicts, batch = setup
    atp = node_scores(hm, batch, dicts, "atp", baseline)
    ig = node_scores(hm, batch, dicts, "ig", baseline, ig_steps=10)
    nodes = _nodes(atp, 40)
    idx = role_index(batch)
    actual, e_atp, e_ig = [], [], []
    for k, g, f in nodes:
        # the node's baseline, computed here: 0, or the mean of a over the group's tokens
        a_clean = atp.clean[k][0][..., f]
        base = torch.zeros_like(a_clean) if baseline == "zero" else \
            torch.full_like(a_clean, float(a_clean[idx == g].mean()))
        actual.append(actual_effect(hm, batch, dicts, k, g, f, base))
        e_atp.append(float(atp.ie[k][g, f]))
        e_ig.append(float(ig.ie[k][g, f]))
    actual, e_atp, e_ig = map(np.array, (actual, e_atp, e_ig))
    rho_atp, rho_ig = spearmanr(e_atp, actual)[0], spearmanr(e_ig, actual)[0]
    print(f"\n{baseline}: Spearman ATP {rho_atp:.3f}, IG {rho_ig:.3f}; mean |error| ATP "
          f"{np.abs(e_atp - actual).mean():.2e}, IG {np.abs(e_ig - actual).mean():.2e}")
    assert rho_atp > 0.6
    assert rho_ig >= rho_atp - 0.02
    assert np.abs(e_ig - actual).mean() <= np.abs(e_atp - actual).mean() * (1.0 if baseline == "zero" else 1.01)


def test_error_node_ie_matches_ablating_the_error(setup):
    """An error node's ATP IE ⟨∂m/∂e, e − 0⟩ ≈ m(M) − m(e set to 0 at its role), to first order."""
    lm, hm, dicts, batch = setup
    s = node_scores(hm, batch, dicts, "atp", "zero")
    idx = role_index(batch)
    ests, acts = [], []
    for key in [("resid", 1), ("attn", 2), ("transcoder", 0)]:
        for g in range(5):
            if not (idx == g).any():
                continue
            d, mask = dicts[key], (idx == g)[..., None]

            def write(x_in, x_out, eps=1e-3):
                a = d.encode(x_in)
                e = x_out - d.decode(a)
                return d.decode(a) + torch.where(mask, (1 - eps) * e, e)

            m_full = m64(hm.run(batch.input_ids, batch.attention_mask).logits, batch)
            acts.append(float(m_full - m64(run_with_site_edit(hm, batch, key, write), batch)) / 1e-3)
            ests.append(float(s.ie_err[key][g]))
    np.testing.assert_allclose(ests, acts, rtol=2e-2, atol=1e-5)
