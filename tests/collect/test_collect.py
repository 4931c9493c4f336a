"""collect: task vectors and the layer sweep, checked against direct computations."""

import json

import pytest
import torch

from icl_cli.collect.vectors import CollectParams, collect_task, role_mass, task_split
from icl_cli.core.layers import parse_layers
from icl_cli.core.batch import encode_prompts
from icl_cli.core.metrics import nll_per_prompt
from icl_cli.core.prompts import sample_prompts
from icl_cli.core.sites import HookedModel, Site, add_at
from icl_cli.core.tasks import load_task
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.core.errors import IclError


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("1-2", 4) == [1, 2]
    assert parse_layers("0,3", 4) == [0, 3]
    with pytest.raises(IclError, match="out of range: the model has layers 0-3"):
        parse_layers("2-5", 4)
    with pytest.raises(IclError, match="cannot read layers"):
        parse_layers("x", 4)


@pytest.fixture(scope="module")
def antonyms_result(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    p = CollectParams(n_shot=4, n_prompts=3, n_eval=5)
    task = load_task("antonyms")
    return hm, p, task, collect_task(hm, tiny_lm.tokenizer, task, [0, 1, 2], p)


def test_task_vector_is_the_mean_hidden_state_at_arrows(tiny_lm, antonyms_result):
    hm, p, task, r = antonyms_result
    train, _ = task_split(task, p.n_eval, p.seed)
    prompts = sample_prompts(train, p.n_prompts, p.n_shot, p.seed, with_answer=True)
    rows = {l: [] for l in range(3)}
    rows_out = {l: [] for l in range(3)}
    for prompt in prompts:  # one at a time, through HF's own hidden_states
        b = encode_prompts(tiny_lm.tokenizer, [prompt])
        hs = tiny_lm.model(input_ids=b.input_ids, output_hidden_states=True).hidden_states
        for l in range(3):
            rows[l].append(hs[l][0][b.role_mask("arrow")[0]])
            rows_out[l].append(hs[l][0][b.role_mask("output")[0]])
    for l in range(3):
        torch.testing.assert_close(r.tv[l], torch.cat(rows[l]).mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r.dv[l], torch.cat(rows_out[l]).mean(0), rtol=1e-4, atol=1e-5)
    assert r.tv.shape == (3, 32)


def test_sweep_matches_a_full_steered_pass(tiny_lm, antonyms_result):
    hm, p, task, r = antonyms_result
    _, heldout = task_split(task, p.n_eval, p.seed)
    zero = sample_prompts(task.pairs, p.n_eval, 0, p.seed + 1, queries=heldout)
    b = encode_prompts(tiny_lm.tokenizer, zero)
    for l in range(3):  # the sweep reuses the residual below l; a full pass must agree
        logits = hm.run(b.input_ids, b.attention_mask, edit={Site("resid_pre", l): add_at(r.tv[l], b.zero_shot_arrow_mask())}).logits
        assert r.sweep["tv_nll"][l] == pytest.approx(nll_per_prompt(logits, b).mean().item(), rel=1e-4)
    plain = hm.run(b.input_ids, b.attention_mask).logits
    assert r.sweep["zero_shot_nll"] == pytest.approx(nll_per_prompt(plain, b).mean().item(), rel=1e-5)
    assert r.best_layer == min(range(3), key=lambda l: r.sweep["tv_nll"][l])
    assert set(r.heldout) == {x for x, _ in heldout}


def test_role_mass_batched_equals_one_at_a_time(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    sae = build(DictConfig(d_in=32, d_sae=64, arch="standard", site="resid_pre", layer=1))
    prompts = sample_prompts(load_task("en_es").pairs, 5, 3, seed=0)
    batched = role_mass(hm, tiny_lm.tokenizer, prompts, sae, batch_size=5)
    single = sum(role_mass(hm, tiny_lm.tokenizer, [pr], sae, batch_size=1) for pr in prompts)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    assert batched.shape == (6, 64) and batched[3].sum() > 0  # arrows fire something


def test_collect_cli_json_reuse_and_errors(tiny_toy_dir, tmp_path):
    from typer.testing import CliRunner

    from icl_cli.cli.app import app

    runner = CliRunner()
    args = ["--store", str(tmp_path / "s"), "--json", "collect", "--model", str(tiny_toy_dir), "--tasks", "antonyms,algo_last",
            "--layers", "1-2", "--n-shot", "3", "--n-prompts", "2", "--n-eval", "4"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data["tasks"]) == {"antonyms", "algo_last"}
    row = data["tasks"]["antonyms"]["layers"]["2"]
    assert set(row) >= {"zero_shot_nll", "tv_nll", "few_shot_nll", "zero_shot_acc", "tv_acc", "few_shot_acc"}
    again = runner.invoke(app, args[:2] + ["-q"] + args[3:])
    assert again.exit_code == 0 and again.stdout.strip() == data["key"]
    table = runner.invoke(app, args[:2] + args[3:])
    assert table.exit_code == 0 and "reusing" in table.stderr and "0-shot" in table.stdout
    bad = runner.invoke(app, args[:3] + ["collect", "--model", str(tiny_toy_dir), "--layers", "7"])
    assert bad.exit_code == 1 and bad.stdout == "" and "out of range" in bad.stderr and "Traceback" not in bad.stderr
    unknown = runner.invoke(app, args[:3] + ["collect", "--model", str(tiny_toy_dir), "--tasks", "antonymz"])
    assert unknown.exit_code == 1 and "did you mean antonyms" in unknown.stderr


def test_interrupted_collect_resumes_from_finished_tasks(tiny_lm, tmp_path, monkeypatch):
    import icl_cli.collect.vectors as collect_mod
    from icl_cli.collect.vectors import run_collect
    from icl_cli.core.tasks import resolve_tasks

    tasks = resolve_tasks("antonyms,en_es,algo_first")
    p = CollectParams(n_shot=3, n_prompts=2, n_eval=4, layers="1-2")
    calls = []
    real = collect_mod.collect_task

    def counting(hm, tok, task, *a, **k):
        calls.append(task.name)
        if task.name == "algo_first" and len(calls) == 3:
            raise KeyboardInterrupt  # killed while working on the third task
        return real(hm, tok, task, *a, **k)

    monkeypatch.setattr(collect_mod, "collect_task", counting)
    with pytest.raises(KeyboardInterrupt):
        run_collect(tiny_lm, tasks, p, work_dir=tmp_path)
    calls.clear()
    layers, resumed = run_collect(tiny_lm, tasks, p, work_dir=tmp_path)
    assert calls == ["algo_first"]  # the two finished tasks were not recomputed
    _, fresh = run_collect(tiny_lm, tasks, p)
    for name in fresh:
        torch.testing.assert_close(resumed[name].tv, fresh[name].tv)
        assert resumed[name].sweep == fresh[name].sweep and resumed[name].heldout == fresh[name].heldout


def test_collect_cli_with_saes_reports_mass_by_role(tiny_toy_dir, tmp_path):
    from typer.testing import CliRunner

    from icl_cli.cli.app import app
    from icl_cli.dictionaries.io import save_saelens

    sae = build(DictConfig(d_in=32, d_sae=48, arch="standard", site="resid_pre", layer=1))
    save_saelens(sae, tmp_path / "sae")
    runner = CliRunner()
    store = ["--store", str(tmp_path / "s")]
    key = runner.invoke(app, store + ["-q", "store", "import", str(tmp_path / "sae"), "--kind", "sae"]).stdout.strip()
    args = ["collect", "--model", str(tiny_toy_dir), "--tasks", "en_it", "--layers", "1", "--n-shot", "3",
            "--n-prompts", "2", "--n-eval", "4", "--saes", key[:10]]
    res = runner.invoke(app, store + ["--json"] + args)
    assert res.exit_code == 0, res.stderr
    pct = json.loads(res.stdout)["tasks"]["en_it"]["mass_pct"][key]
    assert set(pct) == {"none", "prompt", "input", "arrow", "output", "newline"}
    assert sum(pct.values()) == pytest.approx(100.0)
    table = runner.invoke(app, store + args)
    assert "activation mass by token role" in table.stdout
