"""The faithfulness and circuit report sections: sizes read off held-out curves, a curve cut off by
--max-nodes reads "not reached within N (F reached …)", in-sample numbers are labelled so."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icl_cli.store import StepSpec, Store


def _curve(task, n, keep, ablate, n_graph, prompts="held-out"):
    return {"task": task, "n": n, "keep": keep, "ablate": ablate, "n_selected": 3, "n_graph": n_graph,
            "cut_off": n[-1] < n_graph, "max_nodes": n[-1], "prompts": prompts, "seed": 101, "rank": "signed",
            "m_full": -0.5, "m_empty": -4.0}


def _faith_art(store, data):
    def build(st):
        st.write_json("faithfulness.json", data)

    return store.run(StepSpec("faithfulness", {"t": 1}, {}, 2), build).artifact


def test_cut_off_curves_say_not_reached_within_n(tmp_path):
    from icl_cli.report import build_report

    s = Store(tmp_path / "store")
    data = {"prompts": "held-out", "curves": {
        "a" * 64: _curve("antonyms", [0, 1, 2, 5, 10], [0.0, 0.2, 0.3, 0.5, 0.61], [1.0, 0.9, 0.8, 0.7, 0.66], 400),
        "b" * 64: _curve("en_es", [0, 1, 2, 4], [0.0, 0.5, 0.9, 1.0], [1.0, 0.6, 0.4, 0.0], 4)}}
    sec = build_report(s, [_faith_art(s, data).key]).sections[0]
    rows = {r["finding"]: r["ours"] for r in sec.summary["headline"]}
    kept = next(v for k, v in rows.items() if "0.8" in k)
    half = next(v for k, v in rows.items() if "halves" in k)
    assert "antonyms not reached within 10 (F reached 0.61)" in kept
    assert "antonyms not reached within 10 (F reached 0.66)" in half
    assert "en_es ≈ 2" in kept and "held-out" in " ".join(rows)
    # linear in log n between (1, 0.5) and (2, 0.9): 0.8 at 2^0.75; 0.5 between (1, 0.6) and (2, 0.4): 2^0.5
    assert sec.summary["nodes_keep_0.8"]["en_es"] == pytest.approx(2 ** 0.75)
    assert sec.summary["nodes_ablate_half"]["en_es"] == pytest.approx(2 ** 0.5)
    assert sec.summary["nodes_keep_0.8"]["antonyms"] is None
    table = sec.tables[0]
    assert any("not reached within 10" in c for row in table.rows for c in row)
    assert "held-out" in table.title


def test_in_sample_curves_are_labelled(tmp_path):
    from icl_cli.report import build_report

    s = Store(tmp_path / "store")
    data = {"prompts": "in-sample", "curves": {"a" * 64: _curve("antonyms", [0, 1, 2], [0.0, 0.9, 1.0], [1.0, 0.1, 0.0], 2,
                                                                 prompts="in-sample")}}
    sec = build_report(s, [_faith_art(s, data).key]).sections[0]
    assert all("in-sample" in r["finding"] for r in sec.summary["headline"])
    assert "in-sample" in sec.tables[0].title


def test_circuit_section_labels_its_sweep_in_sample(tmp_path, monkeypatch):
    from icl_cli.circuit.graph import CircuitGraph, write_h5
    from icl_cli.report import build_report

    g = CircuitGraph(site=np.array(["resid", "attn"]), layer=np.array([1, 1]), role=np.array(["arrow", "arrow"]),
                     feature=np.array([5, 7]), ie=np.array([0.5, -0.2], dtype=np.float32), act=np.ones(2, dtype=np.float32),
                     selected=np.array([True, False]), edge_src=np.zeros(0, dtype=np.int64),
                     edge_dst=np.zeros(0, dtype=np.int64), edge_weight=np.zeros(0, dtype=np.float32),
                     sweep_threshold=np.array([1.0, 0.5]), sweep_n_nodes=np.array([0, 1]),
                     sweep_faithfulness=np.array([0.0, 0.7]), prompts=["x -> y"],
                     attrs={"model": "toy-icl", "tasks": ["antonyms"], "faithfulness": 0.7, "threshold": 0.5,
                            "metric": "all_pairs_logprob", "m_full": -1.0, "m_empty": -5.0})
    s = Store(tmp_path / "store")

    def build(st):
        with st.h5("circuit.h5") as f:
            write_h5(f, g)

    art = s.run(StepSpec("circuit", {"tasks": ["antonyms"]}, {}, 1), build).artifact
    sec = build_report(s, [art.key]).sections[0]
    note = " ".join(sec.notes)
    assert "in-sample" in note and "not reached within 1 (F reached 0.70)" in note
    assert json.dumps(sec.summary)  # plain JSON


def test_size_verdict_needs_the_papers_range_not_just_a_crossing():
    """Halving faithfulness with 7-27 nodes is not the paper's "a few hundred": the verdict is no."""
    from icl_cli.report.renderers.faithfulness import size_match

    assert size_match({"a": 18.0, "b": 27.0, "c": 7.0}, 1000, "a few hundred", at_least=100).startswith("no:")
    assert "far fewer" in size_match({"a": 18.0}, 1000, "a few hundred", at_least=100)
    assert size_match({"a": 230.0, "b": 400.0}, 1000, "a few hundred", at_least=100).startswith("yes:")
    assert size_match({"a": 230.0, "b": None}, 1000, "a few hundred", at_least=100).startswith("partly:")
    assert size_match({"a": 30.0, "b": 300.0}, 1000, "a few hundred", at_least=100).startswith("partly:")
    assert size_match({"a": None}, 1000, "a few hundred", at_least=100).startswith("no:")
