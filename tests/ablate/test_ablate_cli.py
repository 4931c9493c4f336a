"""``icl ablate`` end to end on the tiny toy model: feature sets from clean and steer artifacts
(steer.h5 written here in the layout fixed between helpers), activation mass, the link, errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.dictionaries.io import save_saelens

TASKS = ["antonyms", "en_fr"]


def _sae(tmp_path, layer: int, seed: int):
    torch.manual_seed(seed)
    d = build(DictConfig(d_in=32, d_sae=64, arch="standard", site="resid_pre", layer=layer))
    with torch.no_grad():
        d.b_enc.uniform_(0.0, 0.3)
    return save_saelens(d, tmp_path / f"sae{layer}")


def _steer(store_path, clean_key: str, sae_key: str, mode: str, layer: int, selected: dict, kept: dict) -> str:
    import h5py

    from icl_cli.store import StepSpec, Store

    feats = sorted({f for v in kept.values() for f in v})

    def build_fn(st):
        with st.h5("steer.h5") as f:
            f.attrs.update({"mode": mode, "layer": layer, "scale": 15.0, "model": "tiny"})
            f.create_dataset("tasks", data=TASKS, dtype=h5py.string_dtype())
            f.create_dataset("features", data=feats)
            if mode == "negative":
                f.create_dataset("scales", data=[1.0, 10.0])
            else:
                f.create_dataset("effect", data=torch.zeros(len(TASKS), len(feats)).numpy())
                for t in TASKS:
                    f.create_dataset(f"selected/{t}", data=torch.tensor(selected[t], dtype=torch.long).numpy())
            for t in TASKS:
                f.create_dataset(f"kept/{t}", data=torch.tensor(kept[t], dtype=torch.long).numpy())

    spec = StepSpec("steer", {"mode": mode, "layer": layer}, {"clean": clean_key, "sae": sae_key}, 1)
    return Store(store_path).run(spec, build_fn).artifact.key


@pytest.fixture(scope="module")
def env(tiny_toy_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate_cli")
    store = str(tmp / "s")
    r = CliRunner()

    def ok(*args):
        out = r.invoke(app, ["--store", store, *args])
        assert out.exit_code == 0, out.stderr
        return out.stdout.strip()

    tv = ok("-q", "collect", "--model", str(tiny_toy_dir), "--tasks", ",".join(TASKS), "--layers", "0-1",
            "--n-shot", "3", "--n-prompts", "2", "--n-eval", "4")
    sae0 = ok("-q", "store", "import", str(_sae(tmp, 0, 0)), "--kind", "sae")
    sae1 = ok("-q", "store", "import", str(_sae(tmp, 1, 1)), "--kind", "sae")
    clean = ok("-q", "clean", "--tv", tv, "--sae", sae1, "--max-steps", "3", "--patience", "2")
    kept = {"antonyms": [1, 2, 3], "en_fr": [3, 4]}
    exe = _steer(store, clean, sae1, "executor", 1, {"antonyms": [2, 3], "en_fr": [4]}, kept)
    det = _steer(store, clean, sae0, "detector", 0, {"antonyms": [5], "en_fr": [6, 7]}, kept)
    neg = _steer(store, clean, sae1, "negative", 1, {}, kept)
    bad_layer = _steer(store, clean, sae0, "executor", 1, {"antonyms": [2], "en_fr": [4]}, kept)
    return {"model": str(tiny_toy_dir), "store": store, "runner": r, "ok": ok, "tv": tv, "sae0": sae0, "sae1": sae1, "clean": clean,
            "exe": exe, "det": det, "neg": neg, "bad_layer": bad_layer}


def _json(env, *args):
    return json.loads(env["ok"]("--json", "ablate", *args))


def test_clean_kept_features_measured_on_collects_prompts(env):
    data = _json(env, "--features", env["clean"], "--roles", "arrow,output")
    assert data["tasks"] == TASKS and data["roles"] == ["arrow", "output"]
    from icl_cli.collect.vectors import read_h5
    from icl_cli.store import Store

    _, results = read_h5(Store(env["store"]).resolve(env["tv"]).file("collect.h5"))
    for t in TASKS:  # the clean run is collect's held-out few-shot evaluation, same prompts
        assert data["base"][t]["nll"] == pytest.approx(results[t].sweep["few_shot_nll"], rel=1e-5)
        cell = data["ablated"][t]["measured"][t]
        assert cell["delta_nll"] == pytest.approx(cell["nll"] - data["base"][t]["nll"], abs=1e-6)


def test_steer_executors_cross_task_and_reuse(env):
    data = _json(env, "--features", env["exe"][:10], "--cross-task", "--mode", "mean")
    assert data["set"] == "executors"
    assert data["ablated"]["antonyms"]["features"] == {env["sae1"]: [2, 3]}
    assert all(v is not None for row in data["delta_nll"] for v in row) and len(data["delta_nll"]) == 2
    out = env["runner"].invoke(app, ["--store", env["store"], "ablate", "--features", env["exe"], "--cross-task", "--mode", "mean"])
    assert out.exit_code == 0 and "reused" in out.stderr
    assert "Δnll" in out.stdout and "1 antonyms" in out.stdout


def test_given_ids_on_every_task(env):
    data = _json(env, "--features", "1:3,1:5", "--sae", env["sae1"], "--roles", "all", "--model", env["model"], "--tasks", ",".join(TASKS))
    assert data["set"] == "given features" and data["sets"] == ["given"]
    assert set(data["ablated"]["given"]["measured"]) == set(TASKS)


def test_activation_mass_of_executors(env):
    data = _json(env, "mass", "--features", env["exe"])
    assert sum(data["per_feature_percent"].values()) == pytest.approx(100.0, abs=1e-3)
    assert sum(data["pooled_percent"].values()) == pytest.approx(100.0, abs=1e-3)
    assert data["tasks"]["en_fr"]["features"] == [4]
    assert data["paper"]["executors_arrow"] == 89.8 and data["paper"]["detectors_output"] == 96.8
    top = _json(env, "mass", "--features", env["clean"], "--top", "1")
    from icl_cli.clean.cleaning import read_h5
    from icl_cli.store import Store

    _, kept = read_h5(Store(env["store"]).resolve(env["clean"]).file("clean.h5"))
    assert {t: r["features"] for t, r in top["tasks"].items()} == {t: r.features[:1] for t, r in kept.items() if r.features}
    table = env["ok"]("ablate", "mass", "--features", env["clean"])
    assert "kept features" in table and "mean of best features" in table and "pooled" in table


def test_detector_executor_link(env):
    data = _json(env, "link", "--detectors", env["det"], "--executors", env["exe"], "--estimand", "ablation", "--removal", "steer", "--scale", "5")
    assert data["detectors"] == [5, 6, 7] and data["executors"] == [2, 3, 4]
    own = {(d, e) for i, d in enumerate(data["detectors"]) for j, e in enumerate(data["executors"]) if data["own"][i][j]}
    assert own == {(5, 2), (5, 3), (6, 4), (7, 4)}
    assert data["detector_layer"] == 0 and data["executor_layer"] == 1
    table = env["ok"]("ablate", "link", "--detectors", env["det"], "--executors", env["exe"], "--estimand", "ablation", "--removal", "steer", "--scale", "5")
    assert "own pairs" in table
    frozen = _json(env, "link", "--detectors", env["det"], "--executors", env["exe"])  # the default estimand
    assert frozen["estimand"] == "frozen-attention" and frozen["own"] == data["own"]
    assert frozen["own_pairs"]["pairs"] + frozen["other_pairs"]["pairs"] <= 9
    assert "own-task" in env["ok"]("ablate", "link", "--detectors", env["det"], "--executors", env["exe"])


def test_errors_are_one_line(env):
    def err(*args, code=1):
        out = env["runner"].invoke(app, ["--store", env["store"], "ablate", *args])
        assert out.exit_code == code and out.stdout == "" and "Traceback" not in out.stderr, out.stderr
        return out.stderr

    assert "beyond the SAE's width 64" in err("--features", "1:99", "--sae", env["sae1"])
    assert "no --sae is for layer 1" in err("--features", "1:3", "--sae", env["sae0"])
    assert "need their SAE" in err("--features", "1:3")
    assert "unknown role" in err("--features", env["clean"], "--roles", "arrows")
    assert "--mode must be" in err("--features", env["clean"], "--mode", "half")
    assert "selects no features" in err("--features", env["neg"])
    assert "its SAE is for layer 0" in err("--features", env["bad_layer"])
    assert "collect artifact" in err("--features", env["tv"])
    assert "--features" in err()
    assert "finite" in err("link", "--detectors", env["det"], "--executors", env["exe"], "--scale", "nan")
    assert "must come before" in err("link", "--detectors", env["exe"], "--executors", env["det"])
    try:
        import icl_cli.cli.faithfulness_cmd  # noqa: F401
    except ModuleNotFoundError:
        assert "faithfulness" in err("--circuit", "abc123")


def test_sae_without_a_layer_takes_the_artifacts(env, tmp_path):
    """The authors' Gemma-1 files record no layer: clean takes --layer, and ablate mass / link then
    use the layer of the clean or steer artifact; the numbers equal those of the same SAE with its layer."""
    torch.manual_seed(1)  # the same weights as sae1, saved without a layer
    d = build(DictConfig(d_in=32, d_sae=64, arch="standard", site="resid_pre", layer=None))
    with torch.no_grad():
        d.b_enc.uniform_(0.0, 0.3)
    ok = env["ok"]
    bare = ok("-q", "store", "import", str(save_saelens(d, tmp_path / "bare")), "--kind", "sae")
    kept = {"antonyms": [1, 2, 3], "en_fr": [3, 4]}
    exe = _steer(env["store"], env["clean"], bare, "executor", 1, {"antonyms": [2, 3], "en_fr": [4]}, kept)
    without = _json(env, "mass", "--features", exe)
    with_layer = _json(env, "mass", "--features", env["exe"])
    assert without["pooled_percent"] == pytest.approx(with_layer["pooled_percent"], abs=1e-6)
    link = _json(env, "link", "--detectors", env["det"], "--executors", exe, "--removal", "steer", "--scale", "5")
    assert link["executor_layer"] == 1
