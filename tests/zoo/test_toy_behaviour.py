"""The bundled toy model really learns in context (small samples; the full figures are in its
metadata file, measured by `icl zoo eval toy-icl`)."""

import pytest
import torch

from icl_cli.collect.vectors import CollectParams, collect_task
from icl_cli.core.batch import encode_prompts
from icl_cli.core.metrics import correct
from icl_cli.core.prompts import ROLES, sample_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import load_task


@pytest.fixture(scope="module")
def toy():
    from icl_cli.core.models import load_model

    torch.set_num_threads(1)
    return load_model("toy-icl", device="cpu")


def _acc(toy, task, n_shot, n=24, seed=11):
    prompts = sample_prompts(load_task(task).pairs, n, n_shot, seed)
    b = encode_prompts(toy.tokenizer, prompts)
    with torch.no_grad():
        return correct(toy.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b).float().mean().item()


@pytest.mark.parametrize("task", ["antonyms", "en_fr", "singular_plural", "algo_last", "country_capital"])
def test_examples_tell_the_task(toy, task):
    assert _acc(toy, task, 16) >= 0.8
    # the same inputs feed several tasks, so without examples the model must guess
    assert _acc(toy, task, 0) <= 0.6


def test_roles_of_the_paper_template(toy):
    prompt = sample_prompts(load_task("en_es").pairs, 1, 2, seed=0)[0]
    b = encode_prompts(toy.tokenizer, [prompt])
    toks = toy.tokenizer.convert_ids_to_tokens(b.input_ids[0])
    roles = [ROLES[c - 1] if c else None for c in b.roles[0].tolist()]
    assert [t for t, r in zip(toks, roles) if r == "arrow"] == ["->"] * 3
    assert [t for t, r in zip(toks, roles) if r == "newline"] == ["\n"] * 2
    assert [t for t, r in zip(toks, roles) if r == "input"] == [x for x, _ in prompt.pairs]
    assert toks[1:5] == ["Follow", "the", "pattern", ":"] and set(roles[1:6]) == {"prompt"}


def test_task_vector_added_at_the_arrow_helps_zero_shot(toy):
    hm = HookedModel(toy.model)
    better = 0
    for task in ("antonyms", "en_it", "present_simple_past_simple"):
        r = collect_task(hm, toy.tokenizer, load_task(task), list(range(hm.n_layers)), CollectParams(n_shot=16, n_prompts=8, n_eval=16))
        best = min(r.sweep["tv_nll"])
        better += best < 0.7 * r.sweep["zero_shot_nll"] and max(r.sweep["tv_acc"]) > r.sweep["zero_shot_acc"]
    assert better >= 2
