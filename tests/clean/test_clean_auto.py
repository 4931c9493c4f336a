"""`clean --l1 auto`: the λ it picks is the largest of the grid whose cleaned vector keeps the
validation nll within tolerance of the raw vector's, measured here with an independent steered
pass (a pre-hook on the decoder block, not the library's cache) on validation prompts rebuilt by
hand from the documented rule."""

import json

import pytest
import torch

from icl_cli.clean.cleaning import CleanParams, clean_task
from icl_cli.collect.vectors import CollectParams, collect_task, task_split
from icl_cli.core.batch import encode_prompts
from icl_cli.core.prompts import sample_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import load_task
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.core.errors import IclError

LAYER = 1
GRID = (3.0, 0.3, 0.03, 0.0)


@pytest.fixture(scope="module")
def env(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    task = load_task("antonyms")
    cp = CollectParams(n_shot=4, n_prompts=3, n_eval=6)
    r = collect_task(hm, tiny_lm.tokenizer, task, [0, 1, 2], cp)
    torch.manual_seed(0)
    sae = build(DictConfig(d_in=32, d_sae=96, arch="gated", site="resid_pre", layer=LAYER))
    with torch.no_grad():
        sae.b_mag.fill_(0.05)
    return hm, task, cp, r.tv[LAYER], sae


@pytest.fixture(scope="module")
def top_down(tiny_lm, env):
    """--l1 auto from the top of GRID."""
    hm, task, cp, v, sae = env
    return clean_task(hm, tiny_lm.tokenizer, sae, task, LAYER, v, _params(l1_start=max(GRID)), (cp.n_eval, cp.seed))


def _params(**kw) -> CleanParams:
    base = dict(l1=None, l1_grid=GRID, l1_start=max(GRID), l1_tolerance=0.0, l1_slack=0.0, max_steps=40, patience=10, lr=0.05,
                n_train=8, n_val=8)
    return CleanParams(**{**base, **kw})


def _validation_prompts(task, cp, p):
    """The documented rule: training pairs that no training prompt asks, 0-shot, seed + 4."""
    train, held = task_split(task, cp.n_eval, cp.seed)
    asked = {q.query for q in sample_prompts(train, p.n_train, 0, p.seed + 3, queries=train)}
    rest = [pair for pair in train if pair not in asked]
    val = sample_prompts(train, p.n_val, 0, p.seed + 4, queries=rest)
    assert not ({q.query for q in val} & asked) and not ({q.query for q in val} & set(held))
    return val


def _steered_nll(lm, prompts, vec) -> float:
    """Mean summed nll of the first two answer tokens with ``vec`` added to the input of block
    LAYER at the query arrow, through a forward pre-hook on the HF block."""
    b = encode_prompts(lm.tokenizer, prompts)
    block = lm.model.model.layers[LAYER]

    def add(module, args, kwargs):
        h = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).clone()
        if vec is not None:
            h[torch.arange(len(prompts)), b.query_arrow] += vec
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": h}
        return (h, *args[1:]), kwargs

    handle = block.register_forward_pre_hook(add, with_kwargs=True)
    try:
        with torch.no_grad():
            logp = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.log_softmax(-1)
    finally:
        handle.remove()
    total = 0.0
    for i in range(len(prompts)):
        for pos, tok in zip(b.answer_pos[i].tolist(), b.answer_ids[i].tolist()):
            if pos >= 0:
                total -= float(logp[i, pos, tok])
    return total / len(prompts)


def test_auto_keeps_the_largest_lambda_whose_validation_nll_passes(tiny_lm, env, top_down):
    hm, task, cp, v, sae = env
    p = _params()
    res = top_down
    val = _validation_prompts(task, cp, p)
    base = _steered_nll(tiny_lm, val, v)
    assert res.auto["val_nll_tv"] == pytest.approx(base, rel=1e-4)
    assert res.auto["limit"] == pytest.approx(base * (1 + p.l1_tolerance) + p.l1_slack, rel=1e-4)

    # every λ of the grid cleaned on its own (explicit --l1), scored by the independent pass
    explicit = {lam: clean_task(hm, tiny_lm.tokenizer, sae, task, LAYER, v, _params(l1=lam), (cp.n_eval, cp.seed))
                for lam in GRID}
    def cleaned_vec(r):
        a = torch.zeros(sae.cfg.d_sae)
        a[r.features] = torch.tensor(r.weights)
        return sae.decode(a).detach()

    val_nll = {lam: _steered_nll(tiny_lm, val, cleaned_vec(r)) for lam, r in explicit.items()}
    passing = [lam for lam in GRID if val_nll[lam] <= base * (1 + p.l1_tolerance) + 1e-6]
    assert passing and passing[0] != GRID[0], "the fixture should make the largest λ fail"  # premise of the test
    assert res.l1 == passing[0] and res.auto["passed"] is True
    # it stops at the first λ that passes: the smaller ones are never run
    assert res.auto["l1"] == list(GRID[: GRID.index(passing[0]) + 1])
    for lam, got in zip(res.auto["l1"], res.auto["val_nll"]):
        assert got == pytest.approx(val_nll[lam], rel=1e-4, abs=1e-5)
    # the chosen λ's result is exactly what --l1 λ gives
    assert res.features == explicit[res.l1].features and res.l0 == explicit[res.l1].l0
    assert res.nll == pytest.approx(explicit[res.l1].nll)


def test_auto_without_a_passing_lambda_takes_the_lowest_validation_nll(tiny_lm, env):
    hm, task, cp, v, sae = env
    res = clean_task(hm, tiny_lm.tokenizer, sae, task, LAYER, v, _params(l1_grid=(3.0, 0.3), l1_tolerance=0.0),
                     (cp.n_eval, cp.seed))
    assert res.auto["passed"] is False and res.auto["l1"] == [3.0, 0.3]
    vals = res.auto["val_nll"]
    assert min(vals) > res.auto["limit"]
    assert res.l1 == res.auto["l1"][vals.index(min(vals))]


def test_auto_needs_validation_queries(tiny_lm, env):
    from icl_cli.core.errors import IclError

    hm, task, cp, v, sae = env
    train, _ = task_split(task, cp.n_eval, cp.seed)
    with pytest.raises(IclError, match="no validation prompts"):
        clean_task(hm, tiny_lm.tokenizer, sae, task, LAYER, v, _params(n_train=10 * len(train)), (cp.n_eval, cp.seed))


def test_params_name_the_bad_option():
    from icl_cli.core.errors import IclError

    for kw, option in ((dict(l1=-1.0), "--l1"), (dict(l1_tolerance=-0.1), "--l1-tolerance"), (dict(l1_slack=-1.0), "--l1-slack"), (dict(n_val=0), "--n-val"),
                       (dict(lr=0.0), "--lr"), (dict(sweep_l1=(-1.0,)), "--sweep-l1"), (dict(l1_grid=()), "--l1-grid")):
        with pytest.raises(IclError) as err:
            CleanParams(**kw)
        assert str(err.value).startswith(option) and "--patience" not in str(err.value)
    assert CleanParams(l1=None, l1_grid=(0.01, 0.1, 0.01)).l1_grid == (0.1, 0.01)  # largest first, once each
    # auto's settings are part of the key only under auto
    assert "l1_tolerance" not in CleanParams(l1=0.05).key_params()
    assert CleanParams(l1=None).key_params()["l1"] == "auto"


def test_clean_cli_defaults_to_auto_and_keeps_explicit_values(tiny_toy_dir, tmp_path, env):
    from typer.testing import CliRunner

    from icl_cli.cli.app import app
    from icl_cli.dictionaries.io import save_saelens

    *_, sae = env
    store = ["--store", str(tmp_path / "s")]
    runner = CliRunner()
    tv = runner.invoke(app, [*store, "-q", "collect", "--model", str(tiny_toy_dir), "--tasks", "antonyms,en_fr",
                             "--layers", "0-1", "--n-shot", "3", "--n-prompts", "2", "--n-eval", "4"]).stdout.strip()
    save_saelens(sae, tmp_path / "sae")
    fast = ["--max-steps", "15", "--patience", "5", "--n-train", "6", "--n-val", "6"]
    auto = runner.invoke(app, [*store, "--json", "clean", "--tv", tv, "--sae", str(tmp_path / "sae"), *fast,
                               "--l1-grid", "3,0.03"])
    assert auto.exit_code == 0, auto.stderr
    data = json.loads(auto.stdout)
    assert data["l1"] == "auto" and data["l1_tolerance"] == 0.1
    for t, r in data["tasks"].items():
        # the search starts at the grid λ nearest the default --l1-start 0.01
        assert r["l1"] in (3.0, 0.03) and r["auto"]["l1"][0] == 0.03 and data["l1_chosen"][t] == r["l1"]
    fixed = runner.invoke(app, [*store, "--json", "clean", "--tv", tv, "--sae", str(tmp_path / "sae"), *fast, "--l1", "0.03"])
    assert fixed.exit_code == 0, fixed.stderr
    fdata = json.loads(fixed.stdout)
    assert fdata["l1"] == 0.03 and all(r["l1"] == 0.03 and "auto" not in r for r in fdata["tasks"].values())
    assert fdata["key"] != data["key"]
    # an auto choice of 0.03 is the explicit 0.03 result
    for t, r in data["tasks"].items():
        if r["l1"] == 0.03:
            assert r["features"] == fdata["tasks"][t]["features"]
    for bad, option in (("-1", "--l1"), ("abc", "--l1")):
        out = runner.invoke(app, [*store, "clean", "--tv", tv, "--sae", str(tmp_path / "sae"), "--l1", bad])
        assert out.exit_code == 1 and out.stdout == "" and option in out.stderr and "Traceback" not in out.stderr
        assert "--patience" not in out.stderr


def test_cleaning_stops_once_no_feature_is_left(tiny_lm, env):
    from icl_cli.clean.cleaning import clean_vector, steer_mask
    from icl_cli.core.steering import BaseCache

    hm, task, cp, v, sae = env
    cache = BaseCache.build(hm, tiny_lm.tokenizer, sample_prompts(task.pairs, 4, 0, seed=5), [LAYER])
    p = CleanParams(l1=1e4, lr=0.5, max_steps=400, patience=100)
    out = clean_vector(hm, sae, cache, LAYER, v, p, p.l1, steer_mask(cache.batch, False))
    assert out.l0 == 0 and (out.acts == 0).all()
    assert out.steps < p.patience  # stopped when L0 hit 0, not `patience` steps later


@pytest.mark.parametrize("start", [0.03, 0.0, 3.0])
def test_a_search_started_elsewhere_finds_the_same_lambda(tiny_lm, env, top_down, start):
    """From --l1-start the search walks up while λs pass and down while they fail: on this
    (monotone) grid it ends at the λ the top-down search picks, trying fewer λs."""
    hm, task, cp, v, sae = env
    top = top_down
    res = clean_task(hm, tiny_lm.tokenizer, sae, task, LAYER, v, _params(l1_start=start or 1e-9), (cp.n_eval, cp.seed))
    assert res.l1 == top.l1 == 0.03 and res.features == top.features
    expected = {0.03: [0.03, 0.3], 0.0: [0.0, 0.03, 0.3], 3.0: [3.0, 0.3, 0.03]}[start]
    assert res.auto["l1"] == expected


def test_l1_start_picks_the_nearest_grid_lambda_in_log_scale():
    grid = (0.1, 0.05, 0.025, 0.01, 0.005, 0.0025, 0.001, 1e-4, 1e-5)
    # 0.007: |ln 0.007 − ln 0.005| = 0.336 < |ln 0.007 − ln 0.01| = 0.357
    for start, want in ((0.01, 0.01), (0.007, 0.005), (0.0075, 0.01), (5.0, 0.1), (1e-9, 1e-5)):
        p = CleanParams(l1=None, l1_grid=grid, l1_start=start)
        assert p.l1_grid[p.start_index] == want, start
    assert "l1_start" in CleanParams(l1=None).key_params() and "l1_start" not in CleanParams(l1=0.05).key_params()
    with pytest.raises(IclError, match="--l1-start"):
        CleanParams(l1=None, l1_start=0.0)
