"""Task vector cleaning: invariants of the optimisation, consistency with collect, CLI errors."""

import json

import pytest
import torch

from icl_cli.clean.cleaning import CleanParams, activation, clean_task, clean_vector, steer_mask
from icl_cli.collect.vectors import CollectParams, collect_task
from icl_cli.core.prompts import sample_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.steering import BaseCache
from icl_cli.core.tasks import load_task
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.dictionaries.io import save_saelens


@pytest.fixture(scope="module")
def setup(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    task = load_task("antonyms")
    cp = CollectParams(n_shot=4, n_prompts=3, n_eval=6)
    r = collect_task(hm, tiny_lm.tokenizer, task, [0, 1, 2], cp)
    torch.manual_seed(0)
    sae = build(DictConfig(d_in=32, d_sae=96, arch="gated", site="resid_pre", layer=1))
    with torch.no_grad():
        sae.b_mag.fill_(0.05)  # a random SAE with a threshold below zero: many features active
    return hm, task, cp, r, sae


@pytest.mark.parametrize("arch", ["gated", "standard", "topk", "jumprelu"])
def test_cleaning_only_shrinks_the_support_and_returns_the_min_l0(tiny_lm, setup, arch):
    hm, task, cp, r, _ = setup
    torch.manual_seed(1)
    sae = build(DictConfig(d_in=32, d_sae=96, arch=arch, site="resid_pre", layer=1, k=12))
    v = r.tv[1]
    prompts = sample_prompts(task.pairs, 6, 0, seed=5)
    cache = BaseCache.build(hm, tiny_lm.tokenizer, prompts, [1])
    p = CleanParams(max_steps=60, patience=15, l1=0.5, lr=0.05)
    out = clean_vector(hm, sae, cache, 1, v, p, p.l1, steer_mask(cache.batch, False))
    start = activation(sae)(sae.encode_pre(v)) > 0
    kept = out.acts > 0
    assert int(kept.sum()) == out.l0 <= int(start.sum())
    assert not (kept & ~start).any()  # the support never grows (no revived feature)
    torch.testing.assert_close(out.vector, sae.decode(out.acts))
    assert out.steps <= p.max_steps
    if arch == "topk":  # it starts from exactly the reconstruction's k features
        from icl_cli.clean.cleaning import initial_theta

        torch.testing.assert_close(torch.relu(initial_theta(sae, v)), sae.encode(v))


def test_no_penalty_and_no_steps_keeps_the_reconstruction(tiny_lm, setup):
    hm, task, cp, r, sae = setup
    prompts = sample_prompts(task.pairs, 4, 0, seed=5)
    cache = BaseCache.build(hm, tiny_lm.tokenizer, prompts, [1])
    out = clean_vector(hm, sae, cache, 1, r.tv[1], CleanParams(max_steps=1, patience=1, lr=1e-9), 0.0, steer_mask(cache.batch, False))
    torch.testing.assert_close(out.vector, sae(r.tv[1]), rtol=1e-5, atol=1e-5)


def test_held_out_losses_agree_with_collect(tiny_lm, setup):
    hm, task, cp, r, sae = setup
    res = clean_task(hm, tiny_lm.tokenizer, sae, task, 1, r.tv[1], CleanParams(max_steps=30, patience=10),
                     (cp.n_eval, cp.seed))
    # the same held-out 0-shot prompts as the collect sweep: the TV and 0-shot losses must match it
    assert res.nll["tv"] == pytest.approx(r.sweep["tv_nll"][1], rel=1e-4)
    assert res.nll["zero_shot"] == pytest.approx(r.sweep["zero_shot_nll"], rel=1e-4)
    assert set(res.nll) == {"zero_shot", "tv", "recon", "cleaned", "ito_5", "ito_20"}
    assert res.l0["ito_5"] <= 5 and res.l0["ito_20"] <= 20
    assert len(res.features) == res.l0["cleaned"] == len(res.weights)
    assert all(w > 0 for w in res.weights) and res.weights == sorted(res.weights, reverse=True)


def test_detector_mode_steers_the_dummy_output(tiny_lm, setup):
    hm, task, cp, r, sae = setup
    res = clean_task(hm, tiny_lm.tokenizer, sae, task, 1, r.dv[1],
                     CleanParams(max_steps=5, patience=5, detectors=True), (cp.n_eval, cp.seed))
    assert res.nll["zero_shot"] != pytest.approx(r.sweep["zero_shot_nll"], rel=1e-6)  # the dummy pair is there


def test_clean_cli_end_to_end_and_errors(tiny_toy_dir, tmp_path, setup):
    from typer.testing import CliRunner

    from icl_cli.cli.app import app

    *_, sae = setup
    store = str(tmp_path / "s")
    runner = CliRunner()
    collect = runner.invoke(app, ["--store", store, "-q", "collect", "--model", str(tiny_toy_dir), "--tasks", "antonyms,en_fr",
                                  "--layers", "0-1", "--n-shot", "3", "--n-prompts", "2", "--n-eval", "4"])
    assert collect.exit_code == 0, collect.stderr
    tv = collect.stdout.strip()
    save_saelens(sae, tmp_path / "sae")
    imp = runner.invoke(app, ["--store", store, "-q", "store", "import", str(tmp_path / "sae"), "--kind", "sae"])
    assert imp.exit_code == 0, imp.stderr
    sae_key = imp.stdout.strip()
    res = runner.invoke(app, ["--store", store, "--json", "clean", "--tv", tv[:8], "--sae", sae_key[:8], "--max-steps", "20",
                              "--patience", "5", "--tasks", "en_fr"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["layer"] == 1 and set(data["tasks"]) == {"en_fr"}
    t = data["tasks"]["en_fr"]
    assert set(t["l0"]) == {"recon", "cleaned", "ito_5", "ito_20"} and "zero_shot" in t["nll"]

    def err(*args):
        out = runner.invoke(app, ["--store", store, "clean", "--tv", tv, *args])
        assert out.exit_code == 1 and out.stdout == "" and "Traceback" not in out.stderr
        return out.stderr

    assert "not in collect artifact" in err("--sae", sae_key, "--tasks", "es_en")
    assert "layer" in err("--sae", sae_key, "--layer", "2")
    wide = build(DictConfig(d_in=48, d_sae=64, arch="standard", site="resid_pre", layer=1))
    save_saelens(wide, tmp_path / "wide")
    assert "d_in 48" in err("--sae", str(tmp_path / "wide"))
    attn = build(DictConfig(d_in=32, d_sae=64, arch="standard", site="attn_out", layer=1))
    save_saelens(attn, tmp_path / "attn")
    assert "resid_pre" in err("--sae", str(tmp_path / "attn"))
    assert "holds layers 0-1 but not 2" in err("--sae", str(_sae_at(tmp_path, 2)))


def _sae_at(tmp_path, layer):
    d = build(DictConfig(d_in=32, d_sae=64, arch="standard", site="resid_pre", layer=layer))
    return save_saelens(d, tmp_path / f"sae_l{layer}")


def test_partial_results_round_trip(tmp_path, tiny_lm, setup):
    from icl_cli.clean.cleaning import CleanResult

    hm, task, cp, r, sae = setup
    res = clean_task(hm, tiny_lm.tokenizer, sae, task, 1, r.tv[1], CleanParams(max_steps=3, patience=3), (cp.n_eval, cp.seed))
    res.save(tmp_path / "t.json")
    assert CleanResult.load(tmp_path / "t.json") == res
    (tmp_path / "bad.json").write_text("{")
    assert CleanResult.load(tmp_path / "bad.json") is None


def test_nan_loss_is_a_clear_error(tiny_lm, setup):
    from icl_cli.core.errors import IclError

    hm, task, cp, r, sae = setup
    prompts = sample_prompts(task.pairs, 4, 0, seed=5)
    cache = BaseCache.build(hm, tiny_lm.tokenizer, prompts, [1])
    v = r.tv[1].clone()
    v[0] = float("nan")
    with pytest.raises(IclError, match="became nan at step 1"):
        clean_vector(hm, sae, cache, 1, v, CleanParams(max_steps=5), 0.05, steer_mask(cache.batch, False))
