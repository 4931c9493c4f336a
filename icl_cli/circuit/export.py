"""Graph exports of a circuit: the attribution-graph JSON of circuit-tracer and Neuronpedia,
Graphviz DOT, and SVG when the `dot` program is installed.

    paths = write_exports(folder, g)   # graph.json, graph-metadata.json, graph.dot[, graph.svg]

Only the circuit is exported: the selected nodes and the edges between them.

graph.json follows the format that circuit-tracer's frontend reads (and Neuronpedia's
graph-schema.json checks): top-level ``metadata`` (slug, scan, prompt, prompt_tokens,
transcoder_list), ``qParams`` (pinnedIds, supernodes, linkType, clickedId, sg_pos), ``nodes``
(node_id, jsNodeId, feature, layer, ctx_idx, feature_type, clerp, influence, activation) and
``links`` (source, target, weight). Our nodes map onto theirs as follows:

* a feature of any dictionary (resid SAE, attn SAE, transcoder) -> ``cross layer transcoder``;
  an error node -> ``mlp reconstruction error`` (the error kind both viewers draw as ◆);
* the node's layer -> ``layer``; its token role -> ``ctx_idx`` (the index of the role in
  ``prompt_tokens`` = the role names; ``pos:i`` -> i in per-position graphs);
* ``feature`` must tell apart the three dictionaries of one layer (the viewer keys a feature by
  layer, feature and ctx_idx), so it is ``site_index · offset + feature`` with offset the power
  of ten above the largest feature id (site_index 0 resid, 1 attn, 2 transcoder); an error
  node's feature is ``-(1 + site_index)``. ``clerp`` spells out site, layer, feature and role;
  extra keys ``site``, ``role``, ``ie`` and ``icl_feature`` keep our own fields;
* ``influence``: the viewer's pruning slider keeps nodes with influence ≤ its value, so a node's
  influence is the cumulative share of |IE| of the nodes ranked before it and itself (the most
  important node has the smallest influence);
* one ``logit`` node stands for the metric, at the arrow role (per-position: the last position),
  with p = exp(m_full), the geometric-mean probability of the answers; the nodes of the most
  downstream (layer, site) of the circuit link to it with their IE (no circuit node lies between
  them and the metric).

graph-metadata.json lists the graph so that circuit-tracer's local server opens the folder
(``serve(data_dir=folder)``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from icl_cli.circuit.graph import ERROR, NODE_SITES, CircuitGraph, check_graph
from icl_cli.core.prompts import ROLES

logger = logging.getLogger("icl")

FEATURE_TYPE = "cross layer transcoder"
ERROR_TYPE = "mlp reconstruction error"
SITE_LABEL = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "transcoder"}
SLUG = "graph"
N_PINNED = 20
SVG_MAX_NODES = 400
"""Larger circuits get DOT only: `dot` needs minutes on them."""
_SITE_COLOURS = {"resid": "#cfe2f3", "attn": "#f9cb9c", "transcoder": "#b6d7a8"}


def write_exports(folder: Path | str, g: CircuitGraph) -> list[Path]:
    """Write graph.json, graph-metadata.json and graph.dot of the circuit of `g` into `folder`,
    plus graph.svg when Graphviz's `dot` is installed; return the paths written."""
    check_graph(g)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = attribution_graph(g)
    paths = [folder / "graph.json", folder / "graph-metadata.json", folder / "graph.dot"]
    paths[0].write_text(json.dumps(doc, ensure_ascii=False))
    index = {key: doc["metadata"][key] for key in ("slug", "scan", "prompt", "prompt_tokens")}
    paths[1].write_text(json.dumps({"graphs": [{**index, "title_prefix": doc["metadata"]["info"]["description"]}]},
                                   ensure_ascii=False, indent=1))
    paths[2].write_text(to_dot(g))
    svg = _render_svg(paths[2], int(np.sum(g.selected)))
    return paths + ([svg] if svg is not None else [])


# ---- node naming -----------------------------------------------------------------------------
def _positions(g: CircuitGraph) -> tuple[list[str], dict[str, int]]:
    """prompt_tokens of the viewer and the ctx_idx of every role in `g`."""
    roles = set(g.role.tolist())
    if any(r.startswith("pos:") for r in roles):
        n = 1 + max((int(r[4:]) for r in roles if r.startswith("pos:")), default=-1)
        return [f"pos {i}" for i in range(n)], {f"pos:{i}": i for i in range(n)}
    unknown = sorted(roles - set(ROLES))
    names = list(ROLES) + unknown
    return names, {r: i for i, r in enumerate(names)}


def _feature_offset(g: CircuitGraph) -> int:
    top = int(g.feature.max()) if len(g.feature) else 0
    return 10 ** max(1, math.ceil(math.log10(top + 1)) if top > 0 else 1)


def _site_index(site: str) -> int:
    return NODE_SITES.index(site) if site in NODE_SITES else len(NODE_SITES)


def _code(site: str, feature: int, offset: int) -> int:
    s = _site_index(site)
    return -(1 + s) if feature == ERROR else s * offset + feature


def _clerp(site: str, layer: int, feature: int, role: str) -> str:
    what = "error" if feature == ERROR else f"#{feature}"
    return f"{SITE_LABEL.get(site, site)} L{layer} {what} @ {role}"


# ---- circuit-tracer / Neuronpedia JSON --------------------------------------------------------
def attribution_graph(g: CircuitGraph) -> dict:
    """The attribution-graph document (a dict ready for json.dumps) of the selected nodes of `g`."""
    tokens, ctx = _positions(g)
    offset = _feature_offset(g)
    keep = np.flatnonzero(g.selected)
    weight = np.abs(g.ie[keep].astype(np.float64))
    order = keep[np.argsort(-weight, kind="stable")]
    total = float(weight.sum()) or 1.0
    influence = dict(zip(order.tolist(), (np.cumsum(np.abs(g.ie[order].astype(np.float64))) / total).tolist()))

    ids: dict[int, str] = {}
    nodes = []
    for i in keep.tolist():
        site, layer, role, feat = str(g.site[i]), int(g.layer[i]), str(g.role[i]), int(g.feature[i])
        code = _code(site, feat, offset)
        ids[i] = f"{layer}_{code}_{ctx[role]}"
        nodes.append({
            "node_id": ids[i], "jsNodeId": ids[i], "feature": code, "layer": str(layer), "ctx_idx": ctx[role],
            "feature_type": ERROR_TYPE if feat == ERROR else FEATURE_TYPE, "clerp": _clerp(site, layer, feat, role),
            "influence": influence[i], "activation": float(g.act[i]), "token_prob": 0.0, "is_target_logit": False,
            "run_idx": 0, "reverse_ctx_idx": 0,
            "site": site, "role": role, "ie": float(g.ie[i]), "icl_feature": feat,
        })
    links = [{"source": ids[s], "target": ids[d], "weight": float(w)}
             for s, d, w in zip(g.edge_src.tolist(), g.edge_dst.tolist(), g.edge_weight.tolist())
             if s in ids and d in ids]

    attrs = {k: _py(v) for k, v in g.attrs.items()}
    metric = str(attrs.get("metric", "metric"))
    m_full = attrs.get("m_full")
    p = math.exp(min(float(m_full), 0.0)) if isinstance(m_full, (int, float)) else 0.0
    if nodes:
        top_layer = max(int(g.layer[i]) for i in keep)
        logit_ctx = len(tokens) - 1 if tokens[0].startswith("pos ") else ctx.get("arrow", 0)
        logit_id = f"{top_layer + 1}_0_{logit_ctx}"
        nodes.append({
            "node_id": logit_id, "jsNodeId": logit_id, "feature": 0, "layer": str(top_layer + 1),
            "ctx_idx": logit_ctx, "feature_type": "logit", "clerp": f'Output "{metric}" (p={p:.3f})',
            "influence": None, "activation": None, "token_prob": p, "is_target_logit": True, "run_idx": 0,
            "reverse_ctx_idx": 0,
        })
        last = max((int(g.layer[i]), _site_index(str(g.site[i]))) for i in keep)
        links += [{"source": ids[i], "target": logit_id, "weight": float(g.ie[i])} for i in keep.tolist()
                  if (int(g.layer[i]), _site_index(str(g.site[i]))) == last]

    tasks = attrs.get("tasks") or []
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    model = str(attrs.get("model", "unknown"))
    faith = attrs.get("faithfulness")
    description = f"icl circuit: {', '.join(tasks) or 'task'} on {model}, {len(keep)} nodes"
    if isinstance(faith, (int, float)):
        description += f", faithfulness {faith:.3f}"
    pinned = [ids[i] for i in order[:N_PINNED].tolist()] + ([nodes[-1]["node_id"]] if nodes else [])
    metadata = {
        "slug": SLUG,
        "scan": model,
        "transcoder_list": [],
        "prompt": g.prompts[0] if g.prompts else "",
        "prompt_tokens": tokens,
        "info": {"description": description, "generator": {"name": "icl circuit", "url": ""}},
        "icl": {k: v for k, v in attrs.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))},
    }
    qparams = {"pinnedIds": pinned, "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def _py(value):
    """numpy scalars and arrays (also inside lists and dicts) as plain Python, for JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_py(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _py(v) for k, v in value.items()}
    return value


# ---- Graphviz ----------------------------------------------------------------------------------
def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g: CircuitGraph) -> str:
    """Graphviz DOT of the selected nodes of `g`, laid out left to right: one column per
    (layer, site) in the order the model computes them, headed by its layer and site; one row
    (a labelled box) per token role. Colour = site, a diamond = an error node; an edge's width
    grows with |weight|, blue when positive, red when negative."""
    _, ctx = _positions(g)
    keep = np.flatnonzero(g.selected).tolist()
    kept = set(keep)
    edges = [(s, d, w) for s, d, w in zip(g.edge_src.tolist(), g.edge_dst.tolist(), g.edge_weight.tolist())
             if s in kept and d in kept]
    wmax = max((abs(w) for *_, w in edges), default=1.0) or 1.0
    lines = [
        "digraph circuit {",
        "  rankdir=LR; newrank=true; nodesep=0.08; ranksep=0.5;",
        '  node [style=filled, fontname="Helvetica", fontsize=9, shape=box, margin="0.05,0.02"];',
        "  edge [arrowsize=0.5];",
    ]
    columns: dict[tuple[int, int], list[int]] = {}
    rows: dict[str, list[int]] = {}
    for i in keep:
        columns.setdefault((int(g.layer[i]), _site_index(str(g.site[i]))), []).append(i)
        rows.setdefault(str(g.role[i]), []).append(i)
    heads = [f"h{layer}_{s}" for layer, s in sorted(columns)]
    for (layer, s), head in zip(sorted(columns), heads):
        site = NODE_SITES[s] if s < len(NODE_SITES) else "other"
        lines.append(f'  {head} [label="layer {layer}\\n{SITE_LABEL.get(site, site)}", shape=plaintext, style=""];')
    if len(heads) > 1:
        lines.append("  " + " -> ".join(heads) + " [style=invis, weight=100];")
    for role in sorted(rows, key=lambda r: ctx.get(r, 0)):
        lines.append(f"  subgraph {_q('cluster_role_' + role)} {{")
        lines.append(f'    label={_q(role)}; style=rounded; color="#999999"; fontname="Helvetica";')
        for i in sorted(rows[role], key=lambda i: -abs(float(g.ie[i]))):
            site, feat = str(g.site[i]), int(g.feature[i])
            what = "error" if feat == ERROR else f"#{feat}"
            label = f"{SITE_LABEL.get(site, site)} L{int(g.layer[i])} {what}\nIE {float(g.ie[i]):+.3g}"
            shape = ", shape=diamond" if feat == ERROR else ""
            lines.append(f'    n{i} [label="{label}", fillcolor="{_SITE_COLOURS.get(site, "#eeeeee")}"{shape}];')
        lines.append("  }")
    for (layer, s), head in zip(sorted(columns), heads):
        lines.append(f"  {{ rank=same; {head}; " + " ".join(f"n{i};" for i in columns[(layer, s)]) + " }")
    for s, d, w in edges:
        width = 0.3 + 4.7 * abs(w) / wmax
        colour = "#3465a4" if w >= 0 else "#cc0000"
        lines.append(f'  n{s} -> n{d} [penwidth={width:.2f}, color="{colour}", tooltip="{w:+.4g}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _render_svg(dot_path: Path, n_nodes: int) -> Path | None:
    """graph.svg beside `dot_path`, or None when `dot` is missing, the graph is too big, or it fails."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    if n_nodes > SVG_MAX_NODES:
        logger.warning("circuit has %d nodes: graph.svg skipped (render graph.dot yourself)", n_nodes)
        return None
    svg = dot_path.with_suffix(".svg")
    try:
        subprocess.run([exe, "-Tsvg", str(dot_path), "-o", str(svg)], check=True, capture_output=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as exc:
        logger.warning("graph.svg not written: dot failed (%s)", re.sub(r"\s+", " ", str(exc))[:200])
        svg.unlink(missing_ok=True)
        return None
    return svg
