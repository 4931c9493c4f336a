"""Faithfulness of stored circuits (held-out curves and the cross-task matrix) against ablations
written here on a tiny float64 model: m(M) is the unablated model on the measured prompts, m(∅)
ablates the circuit's graph nodes only, curves rank by signed IE (positive first) by default."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from icl_cli.circuit.compute import CircuitParams, compute_circuit
from icl_cli.core.prompts import ROLES
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import resolve_tasks
from tests.circuit.helpers import graph_masks, role_index, run_ablating_by_hand, tiny_suite, tiny_toy64, toy_batch
from tests.circuit.test_attribution import m64

D_SAE = 24
TOL_M, TOL_F = 1e-5, 5e-5  # the library's metric is float32 (core.metrics), the one written here float64
P = CircuitParams(n_prompts=2, n_shot=3, edge_nodes=4, seed=0)


@pytest.fixture(scope="module")
def env(tiny_toy_dir):
    torch.manual_seed(0)
    lm = tiny_toy64(tiny_toy_dir)
    hm = HookedModel(lm.model)
    dicts = tiny_suite(lm.d_model, range(lm.n_layers), d_sae=D_SAE, dtype=torch.float64, seed=7)
    tasks = resolve_tasks("antonyms,en_es")
    graphs = [compute_circuit(hm, lm.tokenizer, t, dicts, P, model="tiny") for t in tasks]
    return lm, hm, dicts, tasks, graphs


def pruned(graph, n_keep: int):
    """The graph with only its ``n_keep`` feature nodes of largest |IE| (a graph may store fewer nodes
    than the dictionaries have features; those outside it must never be ablated)."""
    feat = np.flatnonzero(graph.feature >= 0)
    rows = np.sort(feat[np.argsort(-np.abs(graph.ie[feat]), kind="stable")[:n_keep]])
    cols = {f: getattr(graph, f)[rows] for f in ("site", "layer", "role", "feature", "ie", "act", "selected")}
    empty = np.zeros(0, dtype=np.int64)
    return replace(graph, **cols, edge_src=empty, edge_dst=empty, edge_weight=np.zeros(0, dtype=np.float32))


def m_by_hand(hm, batch, dicts, graph, rows) -> float:
    """m with the graph's feature nodes ``rows`` ablated to 0 at their role's tokens (ablation written here)."""
    ablate = graph_masks(graph, rows, list(ROLES), D_SAE)
    return float(m64(run_ablating_by_hand(hm, batch, dicts, ablate, role_index(batch)), batch))


def test_cross_task_cells_against_ablations_by_hand(env):
    from icl_cli.circuit.evaluate import FaithOptions, evaluate_circuits

    lm, hm, dicts, tasks, graphs = env
    circuits = [("key-a", pruned(graphs[0], 200)), ("key-b", graphs[1])]
    rep = evaluate_circuits(hm, lm.tokenizer, dicts, circuits, tasks, FaithOptions(max_nodes=5, cross_task=True))
    cells = {(c.circuit, c.task): c for c in rep.cross}
    assert set(cells) == {(k, t.name) for k, _ in circuits for t in tasks}
    for t in tasks:  # m(M) of (A, B) is the unablated model on B's held-out prompts: the same for every A
        batch = toy_batch(lm, t.name, P.n_prompts, P.n_shot, seed=P.seed + 101)
        m_full = float(m64(hm.run(batch.input_ids, batch.attention_mask).logits, batch))
        for key, graph in circuits:
            c = cells[(key, t.name)]
            assert c.m_full == pytest.approx(m_full, abs=TOL_M)
            feat = np.flatnonzero(graph.feature >= 0)
            sel = np.flatnonzero((graph.feature >= 0) & graph.selected)
            assert 0 < len(sel) < len(feat)
            assert c.m_empty == pytest.approx(m_by_hand(hm, batch, dicts, graph, feat), abs=TOL_M)
            assert c.m_circuit == pytest.approx(m_by_hand(hm, batch, dicts, graph, sel), abs=TOL_M)
            assert c.F == pytest.approx((c.m_circuit - c.m_empty) / (c.m_full - c.m_empty), abs=1e-9)
        assert cells[("key-a", t.name)].m_full == pytest.approx(cells[("key-b", t.name)].m_full, abs=1e-6)
    doc = rep.to_json()["cross_task"]
    assert doc["cols"] == ["antonyms", "en_es"] and doc["rows"] == ["antonyms", "en_es"]
    assert {tuple(sorted(c)) for c in doc["cells"]} == {("F", "circuit", "circuit_task", "m_circuit", "m_empty", "m_full",
                                                          "task")}
    assert doc["matrix"][0][1] == pytest.approx(cells[("key-a", "en_es")].F)


def _ranked(graph, order: str) -> np.ndarray:
    feat = np.flatnonzero(graph.feature >= 0)
    score = -graph.ie[feat] if order == "signed" else -np.abs(graph.ie[feat])
    return feat[np.argsort(score, kind="stable")]


@pytest.mark.parametrize("order", ["signed", "abs"])
def test_curves_on_held_out_prompts_by_hand(env, order):
    from icl_cli.circuit.evaluate import HELD_OUT_SEED_OFFSET, FaithOptions, evaluate_circuits

    lm, hm, dicts, tasks, graphs = env
    graph = pruned(graphs[0], 30)
    rep = evaluate_circuits(hm, lm.tokenizer, dicts, [("key-a", graph)], tasks[:1], FaithOptions(max_nodes=7, rank=order))
    c = rep.curves[0]
    assert HELD_OUT_SEED_OFFSET == 101 and c.prompts == "held-out" and c.seed == P.seed + 101 and c.rank == order
    batch = toy_batch(lm, "antonyms", P.n_prompts, P.n_shot, seed=P.seed + 101)
    assert [pr for pr in graph.prompts] != [lm.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                                           for ids, m in zip(batch.input_ids, batch.attention_mask)]
    m_full = float(m64(hm.run(batch.input_ids, batch.attention_mask).logits, batch))
    ranked = _ranked(graph, order)
    m_empty = m_by_hand(hm, batch, dicts, graph, ranked)
    assert (c.m_full, c.m_empty) == (pytest.approx(m_full, abs=TOL_M), pytest.approx(m_empty, abs=TOL_M))
    F = lambda m: (m - m_empty) / (m_full - m_empty)  # noqa: E731
    assert c.n == [0, 1, 2, 5, 7] and c.n_graph == 30 and c.cut_off
    for n, keep, drop in zip(c.n, c.keep, c.ablate):
        assert keep == pytest.approx(F(m_by_hand(hm, batch, dicts, graph, ranked[n:])), abs=TOL_F), n
        assert drop == pytest.approx(F(m_by_hand(hm, batch, dicts, graph, ranked[:n])), abs=TOL_F), n


def test_signed_ranking_puts_positive_effects_first(env):
    """Ablating the top n by signed IE ablates the supporting nodes; the curve differs from |IE| order."""
    from icl_cli.circuit.evaluate import FaithOptions, evaluate_circuits

    lm, hm, dicts, tasks, graphs = env
    graph = pruned(graphs[0], 30)
    assert (graph.ie[graph.feature >= 0] < 0).any() and (graph.ie[graph.feature >= 0] > 0).any()
    signed, absolute = (evaluate_circuits(hm, lm.tokenizer, dicts, [("a", graph)], tasks[:1],
                                          FaithOptions(max_nodes=30, rank=r)).curves[0] for r in ("signed", "abs"))
    assert signed.ablate != pytest.approx(absolute.ablate, abs=1e-6)
    assert not signed.cut_off and signed.n[-1] == 30
    assert signed.keep[-1] == pytest.approx(1.0, abs=1e-9) and signed.ablate[-1] == pytest.approx(0.0, abs=1e-9)


def test_in_sample_only_on_request(env):
    from icl_cli.circuit.evaluate import FaithOptions, evaluate_circuits

    lm, hm, dicts, tasks, graphs = env
    rep = evaluate_circuits(hm, lm.tokenizer, dicts, [("a", graphs[0])], tasks[:1], FaithOptions(max_nodes=3, in_sample=True))
    c = rep.curves[0]
    assert c.prompts == "in-sample" and c.seed == P.seed
    batch = toy_batch(lm, "antonyms", P.n_prompts, P.n_shot, seed=P.seed)
    assert c.m_full == pytest.approx(float(m64(hm.run(batch.input_ids, batch.attention_mask).logits, batch)), abs=TOL_M)
    assert c.m_full == pytest.approx(graphs[0].attrs["m_full"], abs=1e-6)  # the prompts the circuit was selected on
    assert rep.to_json()["curves"]["a"]["prompts"] == "in-sample"


def test_undefined_cross_task_cell_is_reported_not_raised(env):
    """A circuit whose graph holds no feature node cannot move any metric: F is None for its cells."""
    from icl_cli.circuit.evaluate import FaithOptions, evaluate_circuits

    lm, hm, dicts, tasks, graphs = env
    rep = evaluate_circuits(hm, lm.tokenizer, dicts, [("a", pruned(graphs[0], 0))], tasks,
                            FaithOptions(max_nodes=2, cross_task=True, curves=False))
    assert rep.curves == [] and all(c.F is None and c.m_empty == c.m_full for c in rep.cross)
    assert rep.to_json()["cross_task"]["matrix"] == [[None, None]]
