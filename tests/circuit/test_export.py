"""Graph exports: the attribution-graph JSON has every key circuit-tracer's frontend and Neuronpedia's
graph schema require, links join real nodes, and the DOT file parses with the right counts."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from icl_cli.circuit.export import to_dot, write_exports
from icl_cli.circuit.graph import ERROR, CircuitGraph

# Required keys, read from circuit-tracer's frontend/graph_models.py (pydantic models with no default)
# and Neuronpedia's apps/webapp/app/api/graph/graph-schema.json ("required" lists).
TOP = {"metadata", "qParams", "nodes", "links"}
METADATA = {"slug": str, "scan": str, "prompt_tokens": list, "prompt": str, "transcoder_list": list}
QPARAMS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
NODE = {"node_id": str, "jsNodeId": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str,
        "clerp": str}
LINK = {"source": str, "target": str, "weight": float}
KNOWN_TYPES = {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}


def small_graph(per_position: bool = False) -> CircuitGraph:
    """8 nodes by hand; node 7 is not selected, so it and its edge must not be exported."""
    role = ["output", "arrow", "arrow", "arrow", "output", "arrow", "arrow", "input"]
    if per_position:
        role = [f"pos:{p}" for p in (3, 5, 5, 5, 7, 9, 9, 1)]
    return CircuitGraph(
        site=np.array(["resid", "resid", "attn", "attn", "transcoder", "transcoder", "resid", "resid"]),
        layer=np.array([2, 2, 2, 2, 2, 2, 3, 3]),
        role=np.array(role),
        feature=np.array([17, 17, 17, ERROR, 5, ERROR, 2047, 9]),
        ie=np.array([0.5, -0.2, 0.9, 0.1, 0.3, -0.05, 0.7, 0.01], dtype=np.float32),
        act=np.array([1.5, 0.5, 2.0, 0.0, 0.7, 0.0, 3.0, 0.2], dtype=np.float32),
        selected=np.array([True] * 7 + [False]),
        edge_src=np.array([0, 1, 2, 4, 3, 7, 5]),
        edge_dst=np.array([2, 2, 4, 6, 6, 6, 6]),
        edge_weight=np.array([0.4, -0.1, 0.6, 0.25, 0.05, 0.3, -0.02], dtype=np.float32),
        sweep_threshold=np.array([0.1, 0.01]), sweep_n_nodes=np.array([3, 7]),
        sweep_faithfulness=np.array([0.5, 0.97]),
        prompts=["hot → cold\nup → down\nbig →"],
        attrs={"model": "toy-icl", "tasks": ["antonyms"], "metric": "all_pairs_logprob", "m_full": -0.25,
               "m_empty": -6.0, "faithfulness": 0.97, "threshold": 0.01, "per_position": per_position},
    )


def check_document(doc: dict) -> None:
    assert set(doc) >= TOP
    for section, spec in (("metadata", METADATA), ("qParams", QPARAMS)):
        for key, typ in spec.items():
            assert isinstance(doc[section][key], typ), (section, key)
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids)), "node ids must be unique"
    # the frontend groups nodes by layer_feature_ctx: two nodes may not share it
    keys = [(n["layer"], n["feature"], n["ctx_idx"]) for n in doc["nodes"]]
    assert len(keys) == len(set(keys))
    n_tokens = len(doc["metadata"]["prompt_tokens"])
    for n in doc["nodes"]:
        for key, typ in NODE.items():
            assert isinstance(n[key], typ) and not isinstance(n[key], bool), (key, n)
        assert n["feature_type"] in KNOWN_TYPES
        assert 0 <= n["ctx_idx"] < n_tokens
        assert n["layer"].isdigit()  # the viewer places a node at row +layer + 1
        if n["feature_type"] == "logit":
            assert "(p=" in n["clerp"]  # the frontend parses the probability out of the clerp
        for key in ("influence", "activation"):
            assert n.get(key) is None or isinstance(n[key], float)
    for link in doc["links"]:
        for key, typ in LINK.items():
            assert isinstance(link[key], typ)
        assert link["source"] in ids and link["target"] in ids
    assert set(doc["qParams"]["pinnedIds"]) <= set(ids)


@pytest.mark.parametrize("per_position", [False, True])
def test_json_has_the_frontend_structure(tmp_path, per_position):
    g = small_graph(per_position)
    paths = write_exports(tmp_path / "exports", g)
    names = {p.name for p in paths}
    assert {"graph.json", "graph-metadata.json", "graph.dot"} <= names
    doc = json.loads((tmp_path / "exports" / "graph.json").read_text())
    check_document(doc)
    index = json.loads((tmp_path / "exports" / "graph-metadata.json").read_text())
    assert index["graphs"][0]["slug"] == doc["metadata"]["slug"] == "graph"  # -> graph_data/graph.json

    nodes = {(n.get("site"), n.get("icl_feature"), n.get("role")): n for n in doc["nodes"]}
    assert len(doc["nodes"]) == 7 + 1  # 7 selected + the metric's logit node
    feature_nodes = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    error_nodes = [n for n in doc["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert len(feature_nodes) == 5 and len(error_nodes) == 2
    # roles are positions: the arrow of an aggregated graph is ROLES.index("arrow") == 2
    a = nodes[("attn", 17, "pos:5" if per_position else "arrow")]
    assert a["ctx_idx"] == (5 if per_position else 2) and a["layer"] == "2"
    assert doc["metadata"]["prompt_tokens"][a["ctx_idx"]] == ("pos 5" if per_position else "arrow")
    # the three dictionaries' feature 17 at layer 2 stay distinct
    r = nodes[("resid", 17, "pos:3" if per_position else "output")]
    assert r["feature"] == 17 and a["feature"] == 10000 + 17  # offset: power of ten above 2047
    assert math.isclose(a["ie"], 0.9, rel_tol=1e-6) and math.isclose(a["activation"], 2.0)
    # edges: the unselected node 7 and its edge are gone; weights are carried over
    by_pair = {(lk["source"], lk["target"]): lk["weight"] for lk in doc["links"]}
    assert math.isclose(by_pair[(r["node_id"], a["node_id"])], 0.4, rel_tol=1e-6)
    logit = next(n for n in doc["nodes"] if n["feature_type"] == "logit")
    assert logit["layer"] == "4" and math.isclose(logit["token_prob"], math.exp(-0.25), rel_tol=1e-6)
    into_logit = [lk for lk in doc["links"] if lk["target"] == logit["node_id"]]
    assert len(into_logit) == 1 and math.isclose(into_logit[0]["weight"], 0.7, rel_tol=1e-6)  # resid L3 #2047
    assert len(doc["links"]) == 6 + 1
    # influence: cumulative |IE| share, smallest for the biggest |IE| (0.9), 1 for the smallest
    infl = sorted((n["influence"], abs(n["ie"])) for n in doc["nodes"] if n["feature_type"] != "logit")
    assert math.isclose(infl[0][0], 0.9 / 2.75, rel_tol=1e-5) and math.isclose(infl[-1][0], 1.0, rel_tol=1e-6)
    assert [w for _, w in infl] == sorted((w for _, w in infl), reverse=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot uses old pyparsing names
def test_dot_parses_with_the_right_counts(tmp_path):
    pydot = pytest.importorskip("pydot")
    g = small_graph()
    text = to_dot(g)
    (graph,) = pydot.graph_from_dot_data(text)

    def walk(gr):
        yield gr
        for sub in gr.get_subgraphs():
            yield from walk(sub)

    nodes, edges = set(), []
    for gr in walk(graph):
        nodes |= {n.get_name() for n in gr.get_nodes() if n.get_name() not in ("node", "edge", "graph")}
        edges += [(e.get_source(), e.get_destination(), e.get("style")) for e in gr.get_edges()]
    assert {n for n in nodes if n.startswith("n")} == {f"n{i}" for i in range(7)}
    real = [e for e in edges if e[2] != "invis"]
    assert sorted((s, d) for s, d, _ in real) == sorted(
        [("n0", "n2"), ("n1", "n2"), ("n2", "n4"), ("n4", "n6"), ("n3", "n6"), ("n5", "n6")])
    # one box per role holding exactly that role's nodes (rows by role)
    rows = {s.get_name().strip('"'): {n.get_name() for n in s.get_nodes()} for s in graph.get_subgraphs()
            if s.get_name().strip('"').startswith("cluster_role_")}
    assert rows == {"cluster_role_arrow": {"n1", "n2", "n3", "n5", "n6"}, "cluster_role_output": {"n0", "n4"}}
    # one column per (layer, site), in the model's order: a header chain and rank=same groups
    chain = [e for e in edges if e[0].startswith("h")]
    assert [(s, d) for s, d, _ in chain] == [("h2_0", "h2_1"), ("h2_1", "h2_2"), ("h2_2", "h3_0")]
    columns = [sorted(n.get_name() for n in s.get_nodes() if n.get_name().startswith("n"))
               for s in graph.get_subgraphs() if s.get("rank") == "same"]
    assert sorted(columns) == sorted([["n0", "n1"], ["n2", "n3"], ["n4", "n5"], ["n6"]])
    # the strongest edge is the widest
    widths = {(e.get_source(), e.get_destination()): float(e.get("penwidth")) for gr in walk(graph)
              for e in gr.get_edges() if e.get("penwidth")}
    assert max(widths, key=widths.get) == ("n2", "n4")
    assert widths[("n1", "n2")] > widths[("n5", "n6")] > 0  # by |weight|: -0.1 is stronger than -0.02
    colours = {(e.get_source(), e.get_destination()): e.get("color") for gr in walk(graph) for e in gr.get_edges()}
    assert colours[("n1", "n2")] != colours[("n0", "n2")]  # sign shows as colour


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_svg_written_when_dot_is_installed(tmp_path):
    paths = write_exports(tmp_path, small_graph())
    svg = tmp_path / "graph.svg"
    assert svg in paths and svg.read_text().lstrip().startswith(("<?xml", "<svg"))
    assert svg.read_text().count('class="node"') == 7 + 4  # nodes and the 4 column headers


def test_no_svg_without_dot(tmp_path, monkeypatch):
    import icl_cli.circuit.export as export

    monkeypatch.setattr(export.shutil, "which", lambda name: None)
    paths = write_exports(tmp_path, small_graph())
    assert not (tmp_path / "graph.svg").exists() and len(paths) == 3


def test_numpy_attributes_export(tmp_path):
    g = small_graph()
    g.attrs.update(m_full=np.float32(-0.25), faithfulness=np.float32(0.97), layers=[np.int64(2), np.int64(3)],
                   n_prompts=np.int64(8))
    write_exports(tmp_path, g)
    doc = json.loads((tmp_path / "graph.json").read_text())
    assert doc["metadata"]["icl"]["layers"] == [2, 3] and doc["metadata"]["icl"]["n_prompts"] == 8
    logit = next(n for n in doc["nodes"] if n["feature_type"] == "logit")
    assert math.isclose(logit["token_prob"], math.exp(-0.25), rel_tol=1e-6)
    assert "faithfulness 0.970" in doc["metadata"]["info"]["description"]


def test_empty_circuit_exports(tmp_path):
    g = small_graph()
    g.selected[:] = False
    write_exports(tmp_path, g)
    doc = json.loads((tmp_path / "graph.json").read_text())
    check_document(doc)
    assert doc["nodes"] == [] and doc["links"] == []
