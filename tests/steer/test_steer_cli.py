"""``icl steer`` end to end on a tiny model: the artifact, its JSON, the held-out prompts shared
with clean, the terminal heatmap, exploration, and the one-line errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.dictionaries.io import save_saelens

runner = CliRunner()


def _sae(tmp_path, name, layer=1, d_in=32, model=None, site="resid_pre"):
    torch.manual_seed(0)
    d = build(DictConfig(d_in=d_in, d_sae=48, arch="gated", site=site, layer=layer, model=model))
    with torch.no_grad():
        d.b_mag.fill_(0.05)  # many features active, so cleaning keeps some
    return str(save_saelens(d, tmp_path / name))


@pytest.fixture(scope="module")
def made(tiny_toy_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steer_cli")
    store = str(tmp / "s")

    def ok(*args):
        out = runner.invoke(app, ["--store", store, *args])
        assert out.exit_code == 0, out.stderr
        return out.stdout.strip()

    tv = ok("-q", "collect", "--model", str(tiny_toy_dir), "--tasks", "antonyms,en_fr,singular_plural", "--layers", "0-1",
            "--n-shot", "3", "--n-prompts", "2", "--n-eval", "4")
    sae = ok("-q", "store", "import", _sae(tmp, "sae1"), "--kind", "sae")
    clean = ok("-q", "clean", "--tv", tv, "--sae", sae, "--max-steps", "3", "--patience", "3", "--l1", "0")
    sae0 = ok("-q", "store", "import", _sae(tmp, "sae0", layer=0), "--kind", "sae")
    det = ok("-q", "clean", "--tv", tv, "--sae", sae0, "--max-steps", "3", "--patience", "3", "--l1", "0", "--detectors")
    return {"store": store, "tmp": tmp, "tv": tv, "sae": sae, "clean": clean, "det": det, "ok": ok}


def test_executor_heatmap_json_and_artifact(made):
    from icl_cli.clean.cleaning import read_h5 as read_clean
    from icl_cli.steer.heatmaps import read_h5
    from icl_cli.store import Store

    data = json.loads(made["ok"]("--json", "steer", "--clean", made["clean"][:8], "--n-prompts", "4", "--min-effect", "0.01"))
    assert set(data) >= {"key", "tasks", "features", "effect", "executors"}
    store = Store(made["store"])
    _, cres = read_clean(store.resolve(made["clean"]).file("clean.h5"))
    union = sorted({f for r in cres.values() for f in r.features})
    assert data["features"] == union and data["tasks"] == list(cres)
    assert len(data["effect"]) == 3 and all(len(row) == len(union) for row in data["effect"])
    assert all(0 <= v <= 1 for row in data["effect"] for v in row)
    # the unsteered held-out prompts are exactly clean's held-out 0-shot prompts
    for t, b in zip(data["tasks"], data["base_nll"]):
        assert b == pytest.approx(cres[t].nll["zero_shot"], rel=1e-5)
    art = store.resolve(data["key"])
    assert art.step == "steer" and art.inputs["clean"] == made["clean"] and art.inputs["sae"] == made["sae"]
    r = read_h5(art.file("steer.h5"))
    assert r.kept == {t: cres[t].features for t in cres} and r.scale == 15.0 and r.layer == 1
    # each task's executors satisfy the documented rule: large on the task, small on tasks of other groups
    group = {"antonyms": "linguistic", "singular_plural": "linguistic", "en_fr": "translation"}
    eff = torch.tensor(data["effect"])
    names = data["tasks"]
    for i, t in enumerate(names):
        for f in data["executors"][t]:
            j = data["features"].index(f)
            assert eff[i, j] >= 0.01 and all(eff[k, j] <= 0.5 * eff[i, j] for k in range(3) if group[names[k]] != group[t])
    # the table: a heatmap row per task and the legend
    table = made["ok"]("steer", "--clean", made["clean"], "--n-prompts", "4", "--min-effect", "0.01", "--normalise")
    assert "executor heatmap" in table and "rows normalised" in table and "specificity" in table
    assert all(any(line.startswith(t) and ("█" in line or "·" in line) for line in table.splitlines()) for t in cres)


def test_detector_and_negative_modes(made):
    det = json.loads(made["ok"]("--json", "steer", "--clean", made["det"], "--mode", "detector", "--n-prompts", "3"))
    assert "detectors" in det and det["layer"] == 0
    neg = json.loads(made["ok"]("--json", "steer", "--clean", made["clean"], "--mode", "negative", "--scales", "0,2,8",
                                "--n-prompts", "3"))
    assert neg["scales"] == [0.0, 2.0, 8.0]
    for row, base in zip(neg["nll"], neg["base_nll"]):
        assert all(per_scale[0] == pytest.approx(base, abs=1e-6) for per_scale in row)  # scale 0: every feature unsteered
    table = made["ok"]("steer", "--clean", made["clean"], "--mode", "negative", "--scales", "0,2,8", "--n-prompts", "3")
    assert "negative steering" in table and "s = 8" in table


def test_explore_prints_both_completions(made, tiny_toy_dir):
    out = runner.invoke(app, ["--store", made["store"], "--json", "steer", "explore", "--sae", made["sae"], "--feature", "3",
                              "--scale", "40", "--prompt", r"Follow the pattern:\nhot ->", "--max-new-tokens", "3",
                              "--model", str(tiny_toy_dir)])
    assert out.exit_code == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["prompt"] == "Follow the pattern:\nhot ->" and 1 <= len(data["plain_ids"]) <= 3
    assert set(data) >= {"plain", "steered", "layer"}


def _err(made, *args):
    out = runner.invoke(app, ["--store", made["store"], "steer", *args])
    assert out.exit_code == 1, out.stdout + out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    return out.stderr


def test_errors_are_one_line(made):
    tmp, clean = made["tmp"], made["clean"]
    assert "beyond the SAE's width" in _err(made, "--clean", clean, "--features", "3,48")
    assert "layer 2" in _err(made, "--clean", clean, "--sae", _sae(tmp, "l2", layer=2))
    assert "trained on gpt2" in _err(made, "--clean", clean, "--sae", _sae(tmp, "other", model="gpt2"))
    assert "not detectors" in _err(made, "--clean", clean, "--mode", "detector")
    assert "use --mode detector" in _err(made, "--clean", made["det"])
    assert "finite" in _err(made, "--clean", clean, "--scale", "nan")
    assert "finite" in _err(made, "--clean", clean, "--mode", "negative", "--scales", "1,nan")
    assert "not in clean artifact" in _err(made, "--clean", clean, "--tasks", "es_en")
    assert "--clean is required" in _err(made)
    assert "beyond the SAE's width" in _err(made, "explore", "--sae", made["sae"], "--feature", "99", "--prompt", "hot ->")


def test_negative_from_executors_takes_only_the_rules_executors(made):
    """A task without executors by the rule brings no feature to negative steering (no fallback to
    its best feature); with a loose rule each task brings exactly its executors."""
    none = json.loads(made["ok"]("--json", "steer", "--clean", made["clean"], "--n-prompts", "3", "--min-effect", "5"))
    assert all(not v for v in none["executors"].values())
    neg = json.loads(made["ok"]("--json", "steer", "--clean", made["clean"], "--mode", "negative", "--executors",
                                none["key"], "--scales", "0,4", "--n-prompts", "3"))
    assert neg["features"] == [] and all(not v for v in neg["selected"].values())
    loose = json.loads(made["ok"]("--json", "steer", "--clean", made["clean"], "--n-prompts", "3", "--min-effect", "0",
                                  "--max-other", "100"))
    neg = json.loads(made["ok"]("--json", "steer", "--clean", made["clean"], "--mode", "negative", "--executors",
                                loose["key"], "--scales", "0,4", "--n-prompts", "3"))
    assert neg["selected"] == loose["executors"]
    assert neg["features"] == sorted({f for v in loose["executors"].values() for f in v})
