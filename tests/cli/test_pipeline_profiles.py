"""icl pipeline's per-model profiles (icl_cli/zoo/profiles.py): which defaults --model picks, that
every option overrides its field, and that the chosen settings reach the steps' requests. No
model is run: the collect step is replaced by one that records its request and stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.cli.pipeline_cmd import SMOKE, pipeline_settings
from icl_cli.core.errors import IclError
from icl_cli.core.tasks import builtin_tasks
from icl_cli.zoo.profiles import GENERIC, SMOLLM2, TOY, profile_for

SUITE = Path(__file__).resolve().parents[2] / "icl_cli" / "zoo" / "smollm2-suite" / "manifest.json"


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def test_smollm2_profile_fits_its_suite_and_the_task_groups():
    p = profile_for("smollm2-135m")
    assert p is SMOLLM2
    tasks = _names(p.tasks)
    groups = [builtin_tasks()[t].group for t in tasks]
    assert len(tasks) == 4 and sorted(groups) == ["algorithmic", "knowledge", "linguistic", "translation"]
    # the suite's own record says where its dictionaries are and which layers are executor/detector
    manifest = json.loads(SUITE.read_text())
    assert p.suite == manifest["name"] == "smollm2-suite" and manifest["model"] == "smollm2-135m"
    have = {(d["kind"], d["layer"]) for d in manifest["dictionaries"]}
    assert p.layer == manifest["training"]["executor_layer"] == 21
    assert ("resid", p.layer) in have and ("resid", p.layer - 1) in have
    lo, hi = map(int, p.circuit_layers.split("-"))
    assert {(k, layer) for k in ("resid", "attn", "transcoder") for layer in range(lo, hi + 1)} <= have
    assert list(range(lo, hi + 1)) == manifest["training"]["window"]
    circuit = _names(p.circuit_tasks)
    assert len(circuit) == 3 and set(circuit) <= set(tasks)
    # the sweep is a stated range of SmolLM2's 30 layers that holds the executor layer
    lo, hi = map(int, p.sweep_layers.split("-"))
    assert 0 <= lo <= p.layer <= hi < 30 and hi - lo + 1 < 30
    # every step's request field exists (a typo would only fail during a 40-minute run)
    from dataclasses import fields

    from icl_cli.circuit.evaluate import FaithOptions
    from icl_cli.circuit.step import CircuitRequest
    from icl_cli.clean.step import CleanRequest
    from icl_cli.collect.step import CollectRequest, TopRequest
    from icl_cli.ablate.step import AblateRequest, LinkRequest, MassRequest
    from icl_cli.steer.step import SteerRequest
    from icl_cli.train_sae.step import TrainSaeRequest

    of = {"collect": [CollectRequest], "train-sae": [TrainSaeRequest], "clean": [CleanRequest], "top": [TopRequest],
          "steer": [SteerRequest], "ablate": [AblateRequest, MassRequest, LinkRequest], "circuit": [CircuitRequest],
          "faithfulness": [FaithOptions]}
    for prof in (TOY, SMOLLM2):
        for step, given in prof.steps.items():
            for cls in of[step]:
                assert set(given) <= {f.name for f in fields(cls)}, (prof.name, step, cls.__name__)


def test_toy_profile_keeps_the_old_defaults_and_other_models_get_the_generic_one():
    p = profile_for("toy-icl")
    assert p is TOY
    assert _names(p.tasks) == ["antonyms", "singular_plural", "en_es", "en_fr", "location_continent",
                               "location_religion", "algo_last", "algo_second"]
    assert (p.sweep_layers, p.layer, p.suite, p.circuit_layers) == ("all", None, "toy-icl-suite", "2-4")
    assert (p.clean_l1, p.detector_l1, p.sae_tokens) == (0.005, 0.005, 300_000)
    assert all(v == {} for v in p.steps.values())  # every step's own defaults
    assert p.executor_scale is None and p.detector_scale is None  # steer's own: the paper's 15 and 25
    # the HF id of the SmolLM2 preset is the same model; an unknown folder is not
    assert profile_for("HuggingFaceTB/SmolLM2-135M-Instruct") is SMOLLM2
    other = profile_for("/models/some-other-llama")
    assert other is GENERIC and other.suite == "" and other.circuit_tasks == "" and other.layer is None


def test_options_override_each_field():
    s = pipeline_settings("smollm2-135m", tasks="antonyms,en_es", sweep_layers="all", layer="20",
                          circuit_tasks="antonyms", circuit_layers="19-20", suite="my-suite", sae_tokens=1000,
                          clean_l1="auto", detector_l1="0.02")
    assert (s.tasks, s.sweep_layers, s.layer, s.circuit_tasks, s.circuit_layers, s.suite, s.sae_tokens) == \
        ("antonyms,en_es", "all", 20, "antonyms", "19-20", "my-suite", 1000)
    assert s.clean_l1 is None and s.detector_l1 == 0.02  # auto: clean's per-task search
    assert s.steps["circuit"] == SMOLLM2.steps["circuit"] and s.executor_scale == SMOLLM2.executor_scale
    # an option left out keeps the profile's value; --layer best leaves the choice to the sweep
    s = pipeline_settings("smollm2-135m", layer="best")
    assert s.layer is None and s.suite == "smollm2-suite" and s.clean_l1 == SMOLLM2.clean_l1
    assert pipeline_settings("smollm2-135m") == SMOLLM2
    # an empty --circuit-tasks means no circuits, not the profile's
    assert pipeline_settings("smollm2-135m", circuit_tasks="").circuit_tasks == ""


def test_smoke_settings_go_over_the_profile():
    s = pipeline_settings("smollm2-135m", smoke=True)
    for step, given in SMOKE.items():
        for k, v in given.items():
            assert s.steps[step][k] == v
    # what smoke does not set stays the profile's
    kept = {k: v for k, v in SMOLLM2.steps["train-sae"].items() if k not in SMOKE["train-sae"]}
    assert kept["arch"] == "topk" and all(s.steps["train-sae"][k] == v for k, v in kept.items())
    assert s.layer == 21 and s.tasks == SMOLLM2.tasks


@pytest.mark.parametrize("opt,value", [("--layer", "twenty"), ("--clean-l1", "lots"), ("--detector-l1", "-1")])
def test_bad_option_is_one_line(tmp_path, opt, value):
    with pytest.raises(IclError):
        pipeline_settings("smollm2-135m", **{opt[2:].replace("-", "_"): value})
    r = CliRunner().invoke(app, ["--store", str(tmp_path / "s"), "pipeline", "--model", "smollm2-135m", opt, value])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.h5"))


def _first_request(monkeypatch, tmp_path, *args) -> object:
    """The CollectRequest that `icl pipeline ARGS` gives the collect step (which then stops the run), and stderr."""
    import icl_cli.collect.step as collect_step

    seen = {}

    def fake(env, req):
        seen["req"] = req
        raise IclError("stopped by the test after collect's request")

    monkeypatch.setattr(collect_step, "run_collect", fake)
    r = CliRunner().invoke(app, ["--store", str(tmp_path / "s"), "pipeline", *args])
    assert r.exit_code == 1 and "stopped by the test" in r.stderr, r.output[-2000:]
    return seen["req"], r.stderr


def test_model_picks_the_profile_the_steps_receive(monkeypatch, tmp_path):
    req, err = _first_request(monkeypatch, tmp_path, "--model", "smollm2-135m")
    assert (req.model, req.tasks, req.layers) == ("smollm2-135m", SMOLLM2.tasks, "12-26")
    assert {k: getattr(req, k) for k in SMOLLM2.steps["collect"]} == dict(SMOLLM2.steps["collect"])
    from icl_cli.collect.step import CollectRequest

    default = CollectRequest()
    assert "profile smollm2-135m" in err
    req, _ = _first_request(monkeypatch, tmp_path, "--model", "smollm2-135m", "--tasks", "antonyms",
                            "--sweep-layers", "20-21", "--smoke")
    assert (req.tasks, req.layers, req.n_prompts, req.n_shot) == ("antonyms", "20-21", SMOKE["collect"]["n_prompts"],
                                                                   SMOKE["collect"]["n_shot"])
    req, _ = _first_request(monkeypatch, tmp_path)  # toy-icl: the steps' own defaults
    assert (req.model, req.layers, req.n_prompts, req.n_shot) == ("toy-icl", "all", default.n_prompts, default.n_shot)
