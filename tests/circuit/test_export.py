"""Graph exports: the attribution-graph JSON follows the rules circuit-tracer's frontend and its
graph models impose, keeps exactly the nodes and edges that influence pruning (checked by brute
force over paths) keeps, labels rows and columns, scales weights; the DOT file parses with the
right counts."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest

from icl_cli.circuit.export import attribution_graph, to_dot, write_exports
from icl_cli.circuit.graph import ERROR, CircuitGraph
from tests.circuit.test_prune import expected

# Required keys and types, read from circuit-tracer's frontend/graph_models.py (pydantic models) and
# the fields its frontend reads (util-cg.js: formatData; init-cg-link-graph.js).
TOP = {"metadata", "qParams", "nodes", "links"}
METADATA = {"slug": str, "scan": str, "prompt_tokens": list, "prompt": str, "transcoder_list": list,
            "node_threshold": float}
QPARAMS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
NODE = {"node_id": str, "jsNodeId": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str,
        "clerp": str}
LINK = {"source": str, "target": str, "weight": float}
FEATURE_TYPES = {"resid sae", "attention sae", "transcoder"}
ERROR_TYPES = {"resid reconstruction error", "attention reconstruction error", "mlp reconstruction error"}
KNOWN_TYPES = FEATURE_TYPES | ERROR_TYPES | {"embedding", "logit"}


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
    """The rules of circuit-tracer's graph models and frontend, and ours on top."""
    assert set(doc) >= TOP
    for section, spec in (("metadata", METADATA), ("qParams", QPARAMS)):
        for key, typ in spec.items():
            assert isinstance(doc[section][key], typ), (section, key)
    assert doc["qParams"]["pinnedIds"] == []  # as circuit-tracer writes it (pre-pinned nodes crashed dagre)
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids)), "node ids must be unique"
    # the frontend keys a feature by layer_feature_ctx: two nodes may not share it
    keys = [(n["layer"], n["feature"], n["ctx_idx"]) for n in doc["nodes"]]
    assert len(keys) == len(set(keys))
    n_tokens = len(doc["metadata"]["prompt_tokens"])
    n_rows = len(doc["metadata"]["row_labels"])
    for n in doc["nodes"]:
        for key, typ in NODE.items():
            assert isinstance(n[key], typ) and not isinstance(n[key], bool), (key, n)
        assert n["feature_type"] in KNOWN_TYPES
        assert 0 <= n["ctx_idx"] < n_tokens
        if n["feature_type"] == "embedding":  # the column label: the viewer writes prompt_tokens[ctx] under it
            assert n["layer"] == "E" and n["feature"] == n["ctx_idx"]
        elif n["feature_type"] == "logit":
            assert n["layer"] == str(n_rows) and "(p=" in n["clerp"]  # the frontend parses p out of the clerp
        else:
            assert n["layer"].isdigit() and int(n["layer"]) < n_rows  # the viewer's row: +layer + 1
            assert (n["feature"] == -1) == (n["feature_type"] in ERROR_TYPES)
            assert isinstance(n["influence"], float) and 0 < n["influence"] <= 1 + 1e-9
        for key in ("influence", "activation"):
            assert n.get(key) is None or isinstance(n[key], float)
    for link in doc["links"]:
        for key, typ in LINK.items():
            assert isinstance(link[key], typ)
        assert link["source"] in ids and link["target"] in ids
    if doc["nodes"]:
        logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
        assert len(logits) == 1
        # no isolated node: every circuit node has a link out, so a path to the metric
        sources = {lk["source"] for lk in doc["links"]}
        for n in doc["nodes"]:
            if n["feature_type"] not in ("logit", "embedding"):
                assert n["node_id"] in sources, n
        # weights read in the viewer's 3 decimals: the largest lies in [10, 100)
        top = max(abs(lk["weight"]) for lk in doc["links"])
        assert 10 <= top < 100


def test_structure_rows_columns_and_weights(tmp_path):
    g = small_graph()
    paths = write_exports(tmp_path / "exports", g, node_threshold=1.0, edge_threshold=1.0)
    assert {"graph.json", "graph-metadata.json", "graph.dot"} <= {p.name for p in paths}
    doc = json.loads((tmp_path / "exports" / "graph.json").read_text())
    check_document(doc)
    meta = doc["metadata"]
    assert meta["prompt_tokens"] == ["prompt", "input", "arrow", "output", "newline"]
    # one row per (layer, site) in the model's order; the metric above them
    assert meta["row_labels"] == ["L2 resid_pre", "L2 attn_out", "L2 transcoder", "L3 resid_pre"]
    by_key = {(n.get("site"), n.get("model_layer"), n["feature"], n.get("role")): n for n in doc["nodes"]}
    resid = by_key[("resid", 2, 17, "output")]
    attn = by_key[("attn", 2, 17, "arrow")]
    assert (resid["layer"], resid["feature_type"], resid["ctx_idx"]) == ("0", "resid sae", 3)
    assert (attn["layer"], attn["feature_type"], attn["ctx_idx"]) == ("1", "attention sae", 2)
    assert by_key[("transcoder", 2, 5, "output")]["feature_type"] == "transcoder"
    assert by_key[("transcoder", 2, -1, "arrow")]["feature_type"] == "mlp reconstruction error"
    assert by_key[("attn", 2, -1, "arrow")]["feature_type"] == "attention reconstruction error"
    assert by_key[("resid", 3, 2047, "arrow")]["layer"] == "3"  # the feature index is the dictionary's own
    assert len(doc["nodes"]) == 7 + 1 + 2  # 7 selected, the metric, the columns arrow and output
    assert sorted(n["ctx_idx"] for n in doc["nodes"] if n["feature_type"] == "embedding") == [2, 3]
    # weights ×100 (max |w| 0.7 -> 70), unit in the metadata; the unselected node 7 and its edge are gone
    assert meta["weight_unit"] == "1e-2 nats of all_pairs_logprob" and meta["weight_scale"] == 100.0
    by_pair = {(lk["source"], lk["target"]): lk["weight"] for lk in doc["links"]}
    assert math.isclose(by_pair[(resid["node_id"], attn["node_id"])], 40.0, rel_tol=1e-5)
    assert math.isclose(attn["ie"], 90.0, rel_tol=1e-5) and math.isclose(attn["activation"], 2.0)
    logit = next(n for n in doc["nodes"] if n["feature_type"] == "logit")
    assert logit["ctx_idx"] == 2 and math.isclose(logit["token_prob"], math.exp(-0.25), rel_tol=1e-6)
    # only resid L3 reaches the metric around the circuit (attn L3 is not in it): IE 0.7, no edge out
    into_logit = [lk for lk in doc["links"] if lk["target"] == logit["node_id"]]
    assert [lk["source"] for lk in into_logit] == [by_key[("resid", 3, 2047, "arrow")]["node_id"]]
    assert math.isclose(into_logit[0]["weight"], 70.0, rel_tol=1e-5)
    assert len(doc["links"]) == 6 + 1
    index = json.loads((tmp_path / "exports" / "graph-metadata.json").read_text())["graphs"][0]
    assert index["slug"] == meta["slug"] and index["node_threshold"] == 1.0 and "icl" not in index
    # circuit-tracer's local server reads <slug>.json from the folder
    assert (tmp_path / "exports" / f"{meta['slug']}.json").read_bytes() == (tmp_path / "exports" / "graph.json").read_bytes()


def test_default_pruning_by_hand():
    # influence (shares of each node's input, summed over paths): resid L3 1, tc #5 0.78, attn #17 0.78,
    # resid #17@output 0.625, then 0.156, 0.156, 0.0625; 0.8 of the total 3.5625 is reached at 0.625
    doc = attribution_graph(small_graph())
    check_document(doc)
    kept = {(n["site"], n["feature"], n["role"]) for n in doc["nodes"] if "site" in n}
    assert kept == {("resid", 17, "output"), ("attn", 17, "arrow"), ("transcoder", 5, "output"), ("resid", 2047, "arrow")}
    assert len(doc["links"]) == 4
    assert doc["metadata"]["node_threshold"] == 0.8 and doc["metadata"]["edge_threshold"] == 0.98
    infl = {(n["site"], n["feature"]): n["influence"] for n in doc["nodes"] if "site" in n}
    assert math.isclose(infl[("resid", 2047)], 1 / 3.5625, rel_tol=1e-6)  # the cumulative share
    assert math.isclose(infl[("resid", 17)], 3.1875 / 3.5625, rel_tol=1e-6)


def random_graph(seed: int, n_layers: int = 2, per_site: int = 3) -> CircuitGraph:
    """Random nodes on every (layer, site, role) and random edges between consecutive sites."""
    rng = random.Random(seed)
    sites, layers, roles, feats = [], [], [], []
    for layer in range(1, 1 + n_layers):
        for site in ("resid", "attn", "transcoder"):
            for role in ("input", "arrow", "output"):
                for f in rng.sample(range(300), per_site) + [ERROR]:
                    sites.append(site), layers.append(layer), roles.append(role), feats.append(f)
    n = len(sites)
    feeds = {"attn": [(0, "resid")], "transcoder": [(0, "resid"), (0, "attn")],
             "resid": [(-1, "resid"), (-1, "attn"), (-1, "transcoder")]}
    src, dst, w = [], [], []
    for d in range(n):
        for u in range(n):
            if any(layers[u] == layers[d] + dl and sites[u] == s for dl, s in feeds[sites[d]]) and rng.random() < 0.3:
                src.append(u), dst.append(d), w.append(rng.choice([-1, 1]) * rng.uniform(1e-4, 3e-3))
    return CircuitGraph(
        site=np.array(sites), layer=np.array(layers), role=np.array(roles), feature=np.array(feats),
        ie=np.array([rng.uniform(-4e-3, 4e-3) for _ in range(n)], dtype=np.float32),
        act=np.array([rng.uniform(0, 3) for _ in range(n)], dtype=np.float32),
        selected=np.array([rng.random() < 0.7 for _ in range(n)]),
        edge_src=np.array(src), edge_dst=np.array(dst), edge_weight=np.array(w, dtype=np.float32),
        sweep_threshold=np.array([0.1]), sweep_n_nodes=np.array([n]), sweep_faithfulness=np.array([0.96]),
        prompts=["a → b"], attrs={"model": "tiny", "tasks": ["antonyms"], "metric": "all_pairs_logprob",
                                  "m_full": -0.5, "layers": list(range(1, 1 + n_layers))})


@pytest.mark.parametrize("seed,node_t,edge_t", [(0, 0.8, 0.98), (1, 0.6, 0.9), (2, 0.95, 0.8)])
def test_pruned_export_matches_brute_force(seed, node_t, edge_t):
    g = random_graph(seed)
    doc = attribution_graph(g, node_t, edge_t)
    check_document(doc)
    # the graph by hand: selected nodes, their edges, and the last layer's nodes into the metric
    # with IE minus what their edges carry
    sel = [i for i in range(g.n_nodes) if g.selected[i]]
    out = g.n_nodes
    edges = {(int(u), int(d)): float(x) for u, d, x in zip(g.edge_src, g.edge_dst, g.edge_weight)
             if g.selected[u] and g.selected[d]}
    last = int(g.layer.max())
    for u in sel:
        if g.layer[u] == last:
            direct = float(g.ie[u]) - sum(x for (a, _), x in edges.items() if a == u)
            if direct != 0:
                edges[(u, out)] = direct
    nodes, kept, _ = expected(out + 1, out, edges, node_t, edge_t)
    roles = {"prompt": 0, "input": 1, "arrow": 2, "output": 3, "newline": 4}
    want = {(str(g.site[i]), int(g.layer[i]), int(g.feature[i]), roles[str(g.role[i])]) for i in nodes if i != out}
    got = {(n["site"], n["model_layer"], n["feature"], n["ctx_idx"]) for n in doc["nodes"] if "site" in n}
    assert got == want and 0 < len(got) < len(sel)
    assert len(doc["links"]) == len(kept)
    scale = doc["metadata"]["weight_scale"]
    weights = sorted(round(lk["weight"] / scale, 9) for lk in doc["links"])
    assert np.allclose(weights, sorted(round(edges[e], 9) for e in kept), rtol=1e-4, atol=0)


def test_per_position_columns():
    doc = attribution_graph(small_graph(per_position=True), 1.0, 1.0)
    check_document(doc)
    assert doc["metadata"]["prompt_tokens"] == [f"pos {i}" for i in range(10)]
    logit = next(n for n in doc["nodes"] if n["feature_type"] == "logit")
    assert logit["ctx_idx"] == 9
    attn = next(n for n in doc["nodes"] if n.get("site") == "attn" and n["feature"] == 17)
    assert attn["ctx_idx"] == 5


def test_slug_tells_graphs_apart():
    a, b = small_graph(), small_graph()
    assert attribution_graph(a)["metadata"]["slug"] == attribution_graph(b)["metadata"]["slug"]
    b.ie[0] += 0.01
    slug_a, slug_b = attribution_graph(a)["metadata"]["slug"], attribution_graph(b)["metadata"]["slug"]
    assert slug_a != slug_b and slug_a.startswith("antonyms-toy-icl-")


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
    assert not (tmp_path / "graph.svg").exists() and len(paths) == 4


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
