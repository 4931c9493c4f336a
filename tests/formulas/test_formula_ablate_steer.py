"""Ablation and steering formulas against computations written out here, cell by cell.

Found by mutation testing (scripts/mutation.sh with PROFILE=causal): the detector removals, the link's
own/other means, the cross-task "hurt most by its own features" share, the negative-steering task
direction and the negative sweep's prompts had no test that failed when they were wrong.
"""

import math

import pytest
import torch

from icl_cli.ablate.feature_ablation import AblateResult, own_worst_share
from icl_cli.ablate.link import LinkResult, removal_edit
from icl_cli.collect.vectors import CollectParams, collect_task
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import load_task
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.steer.heatmaps import PromptSource, SteerParams, negative_prompts, negative_task, run_steer


def _sae(d_in=5, d_sae=4, seed=0):
    torch.manual_seed(seed)
    d = build(DictConfig(d_in=d_in, d_sae=d_sae, arch="standard", site="resid_pre", layer=1))
    with torch.no_grad():
        d.W_dec.mul_(3.0)  # rows of norm ≠ 1: the removals must normalise where they say they do
        d.b_enc.uniform_(0.0, 0.5)
        d.b_dec.normal_()
    return d.requires_grad_(False)


@pytest.mark.parametrize("removal", ["project", "feature", "steer"])
def test_detector_removal_by_hand(removal):
    sae, d, scale = _sae(), 2, 4.0
    with torch.no_grad():
        sae.b_enc[d] = 6.0  # the detector fires at every token, so removing it changes x
        sae.W_dec[d] *= 0.4 / sae.W_dec[d].norm()  # a row shorter than 1: normalising must divide by its norm
    x = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    out = removal_edit(sae, d, mask, removal, scale)(x)
    w = sae.W_dec[d]
    u = w / math.sqrt(float((w * w).sum()))
    for b in range(2):
        for p in range(3):
            v = x[b, p]
            if not mask[b, p]:
                want = v
            elif removal == "project":  # drop the component along the unit decoder direction
                want = v - float(v @ u) * u
                assert abs(float(out[b, p] @ u)) < 1e-5
            elif removal == "feature":  # the detector's activation times its (unnormalised) decoder row
                a = max(0.0, float((v - sae.b_dec) @ sae.W_enc[:, d] + sae.b_enc[d]))
                assert a > 0.5
                want = v - a * w
            else:
                want = v - scale * u
            torch.testing.assert_close(out[b, p], want, atol=1e-5, rtol=1e-5)


def test_link_ratio_and_own_vs_other_means_by_hand():
    # 2 tasks, 2 detectors, 3 executors; executor 2 never fires before the removal on its tasks
    before = torch.tensor([[2.0, 1.0, 0.0], [4.0, 0.0, 0.0]])  # [T, E]
    after = torch.tensor([[[1.0, 0.5, 3.0], [3.0, 0.0, 1.0]],
                          [[2.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])  # [D, T, E]
    weights = torch.tensor([[True, True, True], [True, False, True]])  # task 1 does not count for executor 1
    own = torch.tensor([[True, False, False], [False, True, True]])
    r = LinkResult(["a", "b"], [7, 8], [1, 2, 3], before, after, own, weights)
    want = [[None] * 3 for _ in range(2)]
    for i in range(2):
        for e in range(3):
            b = sum(float(before[t, e]) for t in range(2) if weights[t, e])
            a = sum(float(after[i, t, e]) for t in range(2) if weights[t, e])
            want[i][e] = a / b if b > 0 else None
    got = r.ratio
    for i in range(2):
        for e in range(3):
            if want[i][e] is None:
                assert math.isnan(float(got[i, e]))
            else:
                assert float(got[i, e]) == pytest.approx(want[i][e])
    own_vals = [want[i][e] for i in range(2) for e in range(3) if own[i, e] and want[i][e] is not None]
    other_vals = [want[i][e] for i in range(2) for e in range(3) if not own[i, e] and want[i][e] is not None]
    o, x, n_o, n_x = r.own_vs_other()
    assert (n_o, n_x) == (len(own_vals), len(other_vals)) == (2, 2)
    assert o == pytest.approx(sum(own_vals) / 2) and x == pytest.approx(sum(other_vals) / 2)
    assert o != pytest.approx(x)


def test_own_worst_share_by_hand():
    nan = float("nan")
    base = torch.tensor([1.0, 1.0, 2.0, 0.5])  # tasks a, b, c, z (z has no set)
    ablated = torch.tensor([[1.9, 1.1, 2.1, 9.0],   # set a: hurts a most (0.9)
                            [1.0, 1.2, 3.0, 9.0],   # set b: b rises 0.2, but set c hurts b by 0.5
                            [1.2, 1.5, nan, 9.0]])  # set c: not measured on c; set b hurts c by 1.0
    r = AblateResult(["a", "b", "c"], ["a", "b", "c", "z"], {"nll": base}, {"nll": ablated})
    # a: argmax over sets of Δ = (0.9, 0.0, 0.2) -> a ✓; b: (0.1, 0.2, 0.5) -> c ✗; c: (0.1, 1.0, NaN) -> b ✗
    assert own_worst_share(r) == pytest.approx(1 / 3)
    flipped = AblateResult(["a", "b"], ["a", "b"], {"nll": torch.tensor([1.0, 1.0])},
                           {"nll": torch.tensor([[0.5, 1.0], [2.0, 1.5]])})  # Δ a: (−0.5, 1.0) -> b; b: (0, 0.5) -> b
    assert own_worst_share(flipped) == pytest.approx(0.5)
    unmeasured = AblateResult(["a"], ["a"], {"nll": torch.tensor([1.0])}, {"nll": torch.tensor([[nan]])})
    assert own_worst_share(unmeasured) is None
    # an unmeasured cell never wins, even over a loss that fell: b's column is (NaN, −0.2) -> b ✓
    falls = AblateResult(["a", "b"], ["b"], {"nll": torch.tensor([1.0])}, {"nll": torch.tensor([[nan], [0.8]])})
    assert own_worst_share(falls) == pytest.approx(1.0)


def test_negative_sweep_prompts_are_collects_few_shot_evaluation(tiny_lm):
    """The negative sweep's prompts are collect's held-out few-shot prompts: scored by the plain pass,
    their query loss is collect's few-shot loss."""
    from icl_cli.core.steering import plain_scores

    hm = HookedModel(tiny_lm.model)
    task = load_task("antonyms")
    cp = CollectParams(n_shot=3, n_prompts=2, n_eval=5, seed=4)
    res = collect_task(hm, tiny_lm.tokenizer, task, [1], cp)
    src = PromptSource(n_eval=5, seed=4, template=cp.template, n_first=cp.n_first, n_shot=3)
    base = plain_scores(hm, tiny_lm.tokenizer, negative_prompts(task, 5, src), cp.n_first)
    assert base.nll == pytest.approx(res.sweep["few_shot_nll"], rel=1e-5)
    other = plain_scores(hm, tiny_lm.tokenizer, negative_prompts(task, 5, src._replace(seed=5)), cp.n_first)
    assert other.nll != pytest.approx(res.sweep["few_shot_nll"], rel=1e-5)  # the check can tell prompts apart


def test_negative_mode_subtracts_each_feature_of_the_union_on_every_task(tiny_lm):
    """run_steer in negative mode: every feature of the union is subtracted on every task, each along
    W_dec[f]/‖W_dec[f]‖ (written out here); the tasks' own sets are recorded as selected."""
    hm = HookedModel(tiny_lm.model)
    sae = _sae(d_in=tiny_lm.d_model, d_sae=12, seed=3)
    tasks = [load_task("antonyms"), load_task("en_fr")]
    own = {"antonyms": [1, 4], "en_fr": [7]}
    src = PromptSource(n_eval=4, seed=0, n_shot=3)
    p = SteerParams(mode="negative", n_prompts=4, scales=(0.0, 6.0))
    res = run_steer(hm, tiny_lm.tokenizer, tasks, 1, sae, p, src, [1, 4, 7], own, task_features=own)
    assert res.selected == own and res.scales.tolist() == [0.0, 6.0]
    assert tuple(res.nll.shape) == (2, 3, 2)
    units = []
    for f in (1, 4, 7):
        w = sae.W_dec[f].float()
        units.append(w / math.sqrt(float((w * w).sum())))
    units = torch.stack(units)
    for i, t in enumerate(tasks):
        cells = negative_task(hm, tiny_lm.tokenizer, t, 1, units, p, src)
        torch.testing.assert_close(res.nll[i], cells.nll, rtol=1e-5, atol=1e-6)
        assert float(res.nll[i, 2, 1]) != pytest.approx(float(res.nll[i, 2, 0]))  # the sweep moves the loss
