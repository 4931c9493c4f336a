"""Steering: batched cells against single-prompt interventions written here with plain HF hooks,
negative steering at scale 0 against the unsteered run, the executor rule on hand-built matrices."""

import math

import pytest
import torch

from icl_cli.core.prompts import DUMMY_PAIR
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import load_task
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.core.errors import IclError
from icl_cli.steer.heatmaps import (PromptSource, SteerParams, SteerResult, heatmap_prompts, heatmap_task, negative_prompts,
                           negative_task, normalise_rows, read_h5, relative_effect, run_steer, select_executors,
                           specificity, summary_json, unit_directions, write_h5)

LAYER = 1
SRC = PromptSource(n_eval=6, seed=0, template="paper", n_first=2, n_shot=3)


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(3)
    d = build(DictConfig(d_in=32, d_sae=40, arch="standard", site="resid_pre", layer=LAYER))
    with torch.no_grad():
        d.W_dec.mul_(torch.rand(40, 1) * 3 + 0.5)  # rows of unequal norm: the code must normalise them
    return d


def _block(model, layer):
    return model.model.layers[layer]


def _edited_logits(model, ids: torch.Tensor, edits: dict[int, torch.Tensor]) -> torch.Tensor:
    """[P, V] logits of one unpadded prompt with edits {position: vector} added to the input of block
    LAYER: a plain HF forward pre-hook, independent of the code under test."""

    def hook(module, args, kwargs):
        h = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
        for pos, v in edits.items():
            h[0, pos] += v
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": h}
        return (h, *args[1:]), kwargs

    handle = _block(model, LAYER).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits[0].float()
    finally:
        handle.remove()


def _manual_nll(model, tokenizer, text: str, answer: str, edits: dict[int, torch.Tensor], n_first: int = 2) -> float:
    """Summed NLL of the first n_first answer tokens of ``text`` (which ends with " " + answer), with
    edits {position: vector} added to the input of block LAYER; one prompt, no padding, plain HF."""
    assert text.endswith(" " + answer)
    ids = tokenizer(text, return_tensors="pt").input_ids
    n_q = len(tokenizer(text[: -len(" " + answer)]).input_ids)
    assert ids[0, :n_q].tolist() == tokenizer(text[: -len(" " + answer)]).input_ids

    logits = _edited_logits(model, ids, edits)
    total = 0.0
    for pos in range(n_q, min(n_q + n_first, ids.shape[1])):
        total -= torch.log_softmax(logits[pos - 1], -1)[ids[0, pos]].item()
    return total


def _dir(sae, f):
    w = sae.W_dec[f].detach().float()
    return w / w.norm()


@pytest.mark.parametrize("batch_size", [6, 1000])  # one feature per pass, and every feature in one pass
def test_batched_heatmap_equals_single_prompt_interventions(tiny_lm, sae, batch_size):
    hm = HookedModel(tiny_lm.model)
    task = load_task("antonyms")
    feats = [3, 17, 39]
    p = SteerParams(scale=7.0, n_prompts=6, batch_size=batch_size)
    cells = heatmap_task(hm, tiny_lm.tokenizer, task, LAYER, unit_directions(sae, feats), p, SRC)
    prompts = heatmap_prompts(task, 6, SRC, detectors=False)
    for k, f in enumerate(feats):
        manual = []
        for pr in prompts:
            n_q = len(tiny_lm.tokenizer(pr.text[: -len(" " + pr.query[1])]).input_ids)
            manual.append(_manual_nll(tiny_lm.model, tiny_lm.tokenizer, pr.text, pr.query[1], {n_q - 1: 7.0 * _dir(sae, f)}))
        assert float(cells.nll[k]) == pytest.approx(sum(manual) / len(manual), abs=1e-5)
    base = [_manual_nll(tiny_lm.model, tiny_lm.tokenizer, pr.text, pr.query[1], {}) for pr in prompts]
    assert cells.base_nll == pytest.approx(sum(base) / len(base), abs=1e-5)
    assert len(set(cells.nll.tolist())) == 3  # the features really differ


def test_detector_cells_steer_the_dummy_output_token(tiny_lm, sae):
    hm = HookedModel(tiny_lm.model)
    task = load_task("en_fr")
    p = SteerParams(mode="detector", n_prompts=4, batch_size=64)
    assert p.scale == 25.0  # the paper's detector scale is the default
    cells = heatmap_task(hm, tiny_lm.tokenizer, task, LAYER, unit_directions(sae, [5, 8]), p, SRC)
    prompts = heatmap_prompts(task, 4, SRC, detectors=True)
    dummy = f"{DUMMY_PAIR[0]} -> {DUMMY_PAIR[1]}"
    for k, f in enumerate([5, 8]):
        manual = []
        for pr in prompts:
            assert dummy in pr.text
            upto = pr.text[: pr.text.index(dummy) + len(dummy)]
            y_pos = len(tiny_lm.tokenizer(upto).input_ids) - 1
            manual.append(_manual_nll(tiny_lm.model, tiny_lm.tokenizer, pr.text, pr.query[1], {y_pos: 25.0 * _dir(sae, f)}))
        assert float(cells.nll[k]) == pytest.approx(sum(manual) / len(manual), abs=1e-5)


def _manual_arrow_scores(model, tokenizer, text: str, arrows: list[int], v: torch.Tensor) -> tuple[float, float]:
    """(nll, acc) of the token after every arrow, averaged over the arrows, with v added to the input
    of block LAYER at every arrow; one prompt, no padding, plain HF."""
    ids = tokenizer(text, return_tensors="pt").input_ids

    logits = _edited_logits(model, ids, {a: v for a in arrows})
    nll = [-torch.log_softmax(logits[a], -1)[ids[0, a + 1]].item() for a in arrows]
    hit = [float(int(logits[a].argmax()) == int(ids[0, a + 1])) for a in arrows]
    return sum(nll) / len(nll), sum(hit) / len(hit)


def test_negative_steering_subtracts_each_feature_at_every_arrow_and_scores_every_arrow(tiny_lm, sae):
    """SPEC §6: per feature f and scale s, −s·u_f at every arrow of few-shot prompts; nll and accuracy
    of the next token at every arrow. Written out with plain HF hooks, one prompt at a time."""
    hm = HookedModel(tiny_lm.model)
    task = load_task("antonyms")
    tok = tiny_lm.tokenizer
    feats = [2, 9]
    p = SteerParams(mode="negative", scales=(0.0, 4.0, 9.0), n_prompts=5, batch_size=7)
    cells = negative_task(hm, tok, task, LAYER, unit_directions(sae, feats), p, SRC)
    assert cells.nll.shape == (2, 3) and cells.acc.shape == (2, 3)
    prompts = negative_prompts(task, 5, SRC)
    arrow_id = tok.convert_tokens_to_ids("->")
    for k, f in enumerate(feats):
        for j, s in enumerate(p.scales):
            nll, acc = [], []
            for pr in prompts:
                ids = tok(pr.text).input_ids
                arrows = [i for i, x in enumerate(ids) if x == arrow_id]
                assert len(arrows) == SRC.n_shot + 1  # every example's arrow and the query's
                a, b = _manual_arrow_scores(tiny_lm.model, tok, pr.text, arrows, -s * _dir(sae, f))
                nll.append(a)
                acc.append(b)
            assert float(cells.nll[k, j]) == pytest.approx(sum(nll) / 5, abs=1e-5), (f, s)
            assert float(cells.acc[k, j]) == pytest.approx(sum(acc) / 5, abs=1e-6), (f, s)
            if s == 0:
                assert cells.base_nll == pytest.approx(sum(nll) / 5, abs=1e-5)
    assert abs(float(cells.nll[0, 2]) - cells.base_nll) > 1e-4  # the sweep moves the loss
    assert float(cells.nll[0, 2]) != pytest.approx(float(cells.nll[1, 2]), abs=1e-5)  # per feature, not one direction


def test_executor_rule_compares_other_groups_only_unless_strict():
    """Rule ``group`` (SPEC §8): a feature shared by two translation tasks is an executor of both;
    ``strict`` (every other task) rejects it. A feature as strong on another group's task is rejected by both."""
    tasks = ["en_es", "en_fr", "antonyms"]
    groups = {"en_es": "translation", "en_fr": "translation", "antonyms": "linguistic"}
    eff = torch.tensor([[0.6, 0.5, 0.0],    # en_es
                        [0.55, 0.0, 0.0],   # en_fr
                        [0.0, 0.45, 0.3]])  # antonyms
    feats = [100, 101, 102]
    group = select_executors(eff, tasks, feats, 0.2, 0.5, groups)
    strict = select_executors(eff, tasks, feats, 0.2, 0.5)
    # f100 helps en_es and en_fr (same group): shared executor under group, rejected under strict
    assert group == {"en_es": [100], "en_fr": [100], "antonyms": [102]}
    # f101: 0.5 on en_es and 0.45 on antonyms (another group, 0.9 of it) → rejected by both rules
    assert strict == {"en_es": [], "en_fr": [], "antonyms": [102]}


def test_relative_effect_rule_and_specificity_by_hand():
    nll = torch.tensor([[0.5, 1.2, 0.9], [2.0, 1.0, 4.4]])  # 1.2 and 4.4 exceed their base: effect 0
    base = torch.tensor([1.0, 4.0])
    eff = relative_effect(nll, base)
    # (base − min(nll, base)) / base, written out cell by cell
    want = torch.tensor([[0.5, 0.0, 0.1], [0.5, 0.75, 0.0]])
    torch.testing.assert_close(eff, want)
    feats = [10, 11, 12]
    # f10: 0.5 on both tasks (not specific); f11: 0.75 on task b, 0 on a; f12: 0.1 on a only (< min 0.2)
    assert select_executors(eff, ["a", "b"], feats, 0.2, 0.5) == {"a": [], "b": [11]}
    assert select_executors(eff, ["a", "b"], feats, 0.05, 0.5) == {"a": [12], "b": [11]}
    assert select_executors(eff, ["a", "b"], feats, 0.05, 1.0) == {"a": [10, 12], "b": [11, 10]}
    s = specificity(eff)
    # task a's best is f10 (0.5), which helps b as much: not specific; b's best f11 is
    assert s.best == [0, 1] and s.specific == [False, True] and s.share == 0.5
    norm = normalise_rows(eff)
    torch.testing.assert_close(norm, torch.tensor([[1.0, 0.0, 0.2], [0.5 / 0.75, 1.0, 0.0]]))  # 0.2 is not under 0.2
    torch.testing.assert_close(normalise_rows(torch.tensor([[0.5, 0.09]])), torch.tensor([[1.0, 0.0]]))


def test_params_reject_nan_and_unknown_mode():
    with pytest.raises(IclError, match="finite"):
        SteerParams(scale=float("nan"))
    with pytest.raises(IclError, match="finite"):
        SteerParams(mode="negative", scales=(1.0, math.inf))
    with pytest.raises(IclError, match="unknown --mode"):
        SteerParams(mode="sideways")
    assert SteerParams().scale == 15.0


def test_feature_beyond_width_is_an_error(sae):
    with pytest.raises(IclError, match="beyond the SAE's width"):
        unit_directions(sae, [1, 40])


def test_run_steer_resumes_and_the_artifact_round_trips(tiny_lm, sae, tmp_path):
    import h5py

    hm = HookedModel(tiny_lm.model)
    tasks = [load_task("antonyms"), load_task("en_fr")]
    p = SteerParams(scale=5.0, n_prompts=4, min_effect=0.0, max_other=0.9)
    feats = [1, 4, 6]
    kept = {"antonyms": [4, 1], "en_fr": [6]}
    r = run_steer(hm, tiny_lm.tokenizer, tasks, LAYER, sae, p, SRC, feats, kept, model="tiny", work_dir=tmp_path)
    assert r.nll.shape == (2, 3) and r.effect.shape == (2, 3)
    again = run_steer(hm, tiny_lm.tokenizer, tasks, LAYER, sae, p, SRC, feats, kept, model="tiny", work_dir=tmp_path)
    torch.testing.assert_close(again.nll, r.nll)
    with h5py.File(tmp_path / "steer.h5", "w") as f:
        write_h5(f, r)
    back = read_h5(tmp_path / "steer.h5")
    assert isinstance(back, SteerResult)
    assert back.tasks == ["antonyms", "en_fr"] and back.features == feats and back.mode == "executor"
    assert back.layer == LAYER and back.scale == 5.0 and back.kept == kept and back.selected == r.selected
    torch.testing.assert_close(back.effect, r.effect)
    torch.testing.assert_close(back.base_nll, r.base_nll)
    data = summary_json("k" * 64, back)
    assert set(data) >= {"key", "tasks", "features", "effect", "executors"}
    with pytest.raises(IclError, match="not a readable steer artifact"):
        (tmp_path / "bad.h5").write_text("nope")
        read_h5(tmp_path / "bad.h5")


@pytest.mark.parametrize("family", ["gemma", "gemma2", "llama", "mistral", "qwen2", "phi3", "gpt2"])
def test_answer_logits_equal_the_models_own_logits(family):
    from icl_cli.core.sites import Site
    from icl_cli.steer.heatmaps import answer_logits
    from tests.core.tiny_models import tiny_model

    model = tiny_model(family)
    if family == "gemma2":
        model.config.final_logit_softcapping = 3.0  # small, so the capping really bends the logits
    hm = HookedModel(model)
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    last = Site("resid_post", hm.n_layers - 1)
    full = model(input_ids=ids).logits
    resid = hm.run(ids, read=[last], stop_after=last.layer).acts[last]
    pos = torch.tensor([[2, 5], [8, -1], [0, 7]])
    got = answer_logits(hm, resid, pos)
    for b in range(3):
        for j in range(2):
            p = max(int(pos[b, j]), 0)
            torch.testing.assert_close(got[b, j], full[b, p], rtol=1e-5, atol=1e-5)


def test_heatmap_columns_keep_every_tasks_best_feature_and_group_them():
    from icl_cli.steer.view import column_order

    eff = torch.tensor([[0.1, 0.0, 0.9, 0.8, 0.0], [0.05, 0.3, 0.0, 0.0, 0.7], [0.2, 0.0, 0.0, 0.0, 0.0]])
    # the best features are 2 (row 0), 4 (row 1), 0 (row 2); one more column: the next largest, 3
    assert column_order(eff, 4) == [2, 3, 4, 0]
    assert column_order(eff, 2) == [2, 4]
