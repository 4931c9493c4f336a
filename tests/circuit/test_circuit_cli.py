"""`icl circuit` and `icl ablate --circuit` end to end on the tiny toy-vocabulary model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from icl_cli.cli.app import app
from tests.circuit.helpers import tiny_suite, write_suite

FAST = ["--task", "antonyms", "--n-prompts", "2", "--n-shot", "3", "--edge-nodes", "40"]


def icl(store, *args):
    return CliRunner().invoke(app, ["--store", str(store), *args])


@pytest.fixture(scope="module")
def suite_dir(tiny_toy_dir, tmp_path_factory):
    return write_suite(tmp_path_factory.mktemp("suite"), tiny_suite(32, range(3), d_sae=24, model=str(tiny_toy_dir)),
                       model=str(tiny_toy_dir))


@pytest.fixture(scope="module")
def circuit(tiny_toy_dir, suite_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    r = icl(store, "--json", "circuit", "--model", str(tiny_toy_dir), "--saes", str(suite_dir), *FAST)
    assert r.exit_code == 0, r.stderr
    return store, json.loads(r.stdout)


def test_json_artifact_and_exports(circuit, tiny_toy_dir, suite_dir):
    store, out = circuit
    assert set(out) >= {"key", "n_nodes", "n_edges", "threshold", "faithfulness", "top_nodes"}
    assert out["faithfulness"] >= 0.95 and out["n_nodes"] > 0 and out["n_edges"] > 0
    top = out["top_nodes"][0]
    assert set(top) == {"site", "layer", "role", "feature", "ie"}
    ies = [abs(n["ie"]) for n in out["top_nodes"]]
    assert ies == sorted(ies, reverse=True)
    from icl_cli.circuit.graph import read_h5
    from icl_cli.store import Store

    art = Store(store).resolve(out["key"])
    g = read_h5(art.file("circuit.h5"))
    assert int(g.selected.sum()) == out["n_nodes"] and g.n_edges == out["n_edges"]
    assert g.attrs["method"] == "atp" and g.attrs["tasks"] == ["antonyms"] and len(g.prompts) == 2
    assert (art.path / "exports" / "graph.json").is_file() and (art.path / "exports" / "graph.dot").is_file()
    # the sweep is stored and its chosen point is the smallest one at the target
    ok = g.sweep_n_nodes[g.sweep_faithfulness >= 0.95]
    assert g.attrs["n_selected"] == ok.min()
    # the table for people
    r = icl(store, "circuit", "--model", str(tiny_toy_dir), "--saes", str(suite_dir), *FAST)
    assert r.exit_code == 0 and "strongest edges" in r.stdout and "arrow" in r.stdout


@pytest.fixture(scope="module")
def second(circuit, tiny_toy_dir, suite_dir):
    store, _ = circuit
    r = icl(store, "--json", "circuit", "--model", str(tiny_toy_dir), "--saes", str(suite_dir), *FAST[2:], "--task", "en_es")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)["key"]


def test_faithfulness_curves_and_cross_task(circuit, second):
    store, out = circuit
    r = icl(store, "--json", "ablate", "--circuit", f"{out['key']},{second}", "--max-nodes", "30", "--cross-task")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    c = data["curves"][out["key"]]
    assert c["n"][0] == 0 and c["keep"][0] == pytest.approx(0.0, abs=1e-9) and c["ablate"][0] == pytest.approx(1.0, abs=1e-9)
    assert max(c["n"]) == 30 and c["cut_off"] and c["n_graph"] > 30
    assert c["prompts"] == "held-out" and c["rank"] == "signed" and c["seed"] == 101
    x = data["cross_task"]
    assert x["cols"] == ["antonyms", "en_es"] and x["rows"] == ["antonyms", "en_es"] and len(x["matrix"]) == 2
    cells = {(cell["circuit"], cell["task"]): cell for cell in x["cells"]}
    for t in ("antonyms", "en_es"):  # m(M) of (A, B) = m(M) of (B, B): the unablated model on B
        assert cells[(out["key"], t)]["m_full"] == pytest.approx(cells[(second, t)]["m_full"], abs=1e-6)
    assert cells[(out["key"], "antonyms")]["m_full"] == pytest.approx(c["m_full"], abs=1e-6)
    for cell in cells.values():
        m = (cell["m_circuit"] - cell["m_empty"]) / (cell["m_full"] - cell["m_empty"])
        assert cell["F"] == pytest.approx(m)
    # in-sample on request, labelled so; the same prompts as the circuit's selection
    r = icl(store, "--json", "ablate", "--circuit", out["key"], "--max-nodes", "5", "--in-sample", "--rank", "abs")
    assert r.exit_code == 0, r.stderr
    c = json.loads(r.stdout)["curves"][out["key"]]
    assert c["prompts"] == "in-sample" and c["rank"] == "abs" and c["seed"] == 0
    r = icl(store, "ablate", "--circuit", out["key"], "--max-nodes", "5", "--in-sample")
    assert r.exit_code == 0 and "in-sample" in r.stdout and "not reached within 5" in r.stdout


def test_faithfulness_bad_input_is_one_line(circuit, second, tiny_toy_dir):
    store, out = circuit
    _one_line_error(icl(store, "ablate", "--circuit", out["key"], "--cross-task"), "--cross-task", "two tasks")
    _one_line_error(icl(store, "ablate", "--circuit", out["key"], "--cross-task", "--tasks", "en_es"), "two tasks")
    _one_line_error(icl(store, "ablate", "--circuit", out["key"], "--max-nodes", "0"), "--max-nodes")
    _one_line_error(icl(store, "ablate", "--circuit", out["key"], "--model", "toy-icl"), "toy-icl", str(tiny_toy_dir.name))
    _one_line_error(icl(store, "ablate", "--circuit", out["key"], "--rank", "up"), "--rank")


def test_estimate_prints_without_running(tiny_toy_dir, suite_dir, tmp_path):
    r = icl(tmp_path, "--json", "circuit", "--model", str(tiny_toy_dir), "--saes", str(suite_dir), *FAST, "--estimate")
    assert r.exit_code == 0, r.stderr
    e = json.loads(r.stdout)
    assert e["total_gib"] > e["peak_gib"] > 0 and e["phase"] in e["phases_gib"] and e["seconds"] > 0
    from icl_cli.store import Store

    assert not Store(tmp_path).artifacts(step="circuit")


def _one_line_error(r, *words):
    assert r.exit_code == 1, r.stdout
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_errors_are_one_line(tiny_toy_dir, suite_dir, tmp_path, monkeypatch):
    model = ["--model", str(tiny_toy_dir)]
    short = write_suite(tmp_path / "short", tiny_suite(32, range(2), d_sae=8), model=str(tiny_toy_dir))
    _one_line_error(icl(tmp_path, "circuit", *model, "--saes", str(short), *FAST), "lacks", "layers 2")
    other = write_suite(tmp_path / "other", tiny_suite(48, range(3), d_sae=8), model=str(tiny_toy_dir))
    _one_line_error(icl(tmp_path, "circuit", *model, "--saes", str(other), *FAST), "another model")
    _one_line_error(icl(tmp_path, "circuit", *model, "--saes", str(suite_dir), "--saes", "resid:x=foo", *FAST), "KIND:LAYER=REF")
    import icl_cli.circuit.compute as compute
    import icl_cli.circuit.estimate as estimate

    monkeypatch.setattr(compute, "context_length", lambda cfg: 20)
    _one_line_error(icl(tmp_path, "circuit", *model, "--saes", str(suite_dir), *FAST), "context", "--n-shot")
    monkeypatch.undo()
    monkeypatch.setattr(estimate, "free_memory", lambda device: 1000)
    _one_line_error(icl(tmp_path, "circuit", *model, "--saes", str(suite_dir), *FAST), "GiB", "--force")
