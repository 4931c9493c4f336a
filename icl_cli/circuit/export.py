"""Graph exports of a circuit: the attribution-graph JSON of circuit-tracer's viewer (also what
``icl circuit serve`` shows), Graphviz DOT, and SVG when the `dot` program is installed.

    paths = write_exports(folder, g)   # graph.json, graph-metadata.json, graph.dot, <slug>.json[, graph.svg]
    doc = attribution_graph(g, node_threshold=0.8, edge_threshold=0.98)

graph.json has circuit-tracer's layout (its frontend's graph_models.py): ``metadata`` (slug,
scan, prompt, prompt_tokens, transcoder_list, node_threshold, schema_version), ``qParams``
(pinnedIds, supernodes, linkType, clickedId, sg_pos: empty, as circuit-tracer writes them),
``nodes`` (node_id, jsNodeId, feature, layer, ctx_idx, feature_type, clerp, influence,
activation, ...) and ``links`` (source, target, weight). Our circuit maps onto it so:

* columns (``ctx_idx``) are token roles: ``prompt_tokens`` = the role names ("prompt", "input",
  "arrow", "output", "newline"), or "pos i" in per-position graphs. One ``embedding`` node per
  column in use (layer "E", no edges) is where the viewer writes a column's token label.
* rows (``layer``): one per (model layer, site) of the circuit in the order the model computes
  them (resid_pre, attn_out, transcoder), numbered from 0; ``metadata.row_labels`` names them
  ("L3 attn_out") and each node keeps ``model_layer`` and ``site``. So each dictionary has its own
  row and its own ``feature_type`` ("resid sae", "attention sae", "transcoder"; errors
  "resid reconstruction error", "attention reconstruction error", "mlp reconstruction error"),
  and ``feature`` is the dictionary's own feature index (-1 for an error node).
* one ``logit`` node, the metric, in the row above the last one, at the arrow column (the last
  position in per-position graphs), with p = exp(m_full), the geometric-mean probability of the
  answers. A node of a site whose output reaches the metric around the circuit (a downstream
  consecutive site is not in the circuit: every site of the last layer) links to it with the part
  of its IE that its edges in the graph do not carry, IE − Σ out-edge weights (the whole IE for
  the last layer's transcoder).
* pruning as circuit-tracer does it (prune.py): nodes by influence on the metric (``node_threshold``
  of the total), edges by influence (``edge_threshold``), then nodes without a path to the metric
  go. The metric's node is always kept. A node's ``influence`` is its cumulative influence share,
  which the viewer's slider compares with its value.
* weights: link weights and the nodes' ``ie`` are changes of the metric (nats of
  all_pairs_logprob), multiplied by a power of ten so that the largest |weight| lies in [10, 100)
  (the viewer prints 3 decimals); ``metadata.weight_unit`` says the unit, ``weight_scale`` the
  factor.
* ``slug``: tasks, model and a digest of the graph, so that graphs of one folder stay apart.

graph-metadata.json lists the graph and ``<slug>.json`` (the same file as graph.json, hard-linked)
holds it, so circuit-tracer's local server opens the folder (``serve(data_dir=folder)``);
``icl circuit serve`` needs neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from icl_cli.circuit.graph import ERROR, NODE_SITES, CircuitGraph, check_graph
from icl_cli.circuit.prune import prune
from icl_cli.core.prompts import ROLES

logger = logging.getLogger("icl")

FEATURE_TYPES = {"resid": "resid sae", "attn": "attention sae", "transcoder": "transcoder"}
ERROR_TYPES = {"resid": "resid reconstruction error", "attn": "attention reconstruction error",
               "transcoder": "mlp reconstruction error"}
SITE_LABEL = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "transcoder"}
NODE_THRESHOLD = 0.8
EDGE_THRESHOLD = 0.98
"""circuit-tracer's default pruning thresholds."""
SVG_MAX_NODES = 400
"""Larger circuits get DOT only: `dot` needs minutes on them."""
_SITE_COLOURS = {"resid": "#cfe2f3", "attn": "#f9cb9c", "transcoder": "#b6d7a8"}


def write_exports(folder: Path | str, g: CircuitGraph, node_threshold: float = NODE_THRESHOLD,
                  edge_threshold: float = EDGE_THRESHOLD) -> list[Path]:
    """Write graph.json, graph-metadata.json and graph.dot of the circuit of `g` into `folder`,
    plus graph.svg when Graphviz's `dot` is installed; return the paths written."""
    check_graph(g)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = attribution_graph(g, node_threshold, edge_threshold)
    paths = [folder / "graph.json", folder / "graph-metadata.json", folder / "graph.dot"]
    paths[0].write_text(json.dumps(doc, ensure_ascii=False))
    paths[1].write_text(json.dumps({"graphs": [index_entry(doc)]}, ensure_ascii=False, indent=1))
    paths[2].write_text(to_dot(g))
    paths.append(_same_file(paths[0], folder / f"{doc['metadata']['slug']}.json"))
    svg = _render_svg(paths[2], int(np.sum(g.selected)))
    return paths + ([svg] if svg is not None else [])


def _same_file(src: Path, dst: Path) -> Path:
    """``dst`` with the content of ``src``: a hard link where the file system allows, else a copy
    (circuit-tracer's local server reads ``<slug>.json``; ours and the store use graph.json)."""
    dst.unlink(missing_ok=True)
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def index_entry(doc: dict) -> dict:
    """The graph's entry in graph-metadata.json: its metadata without our own fields."""
    meta = {k: v for k, v in doc["metadata"].items() if k not in ("icl", "info")}
    return {**meta, "title_prefix": doc["metadata"]["info"]["description"]}


# ---- rows, columns and node naming -----------------------------------------------------------
def _positions(g: CircuitGraph) -> tuple[list[str], dict[str, int]]:
    """prompt_tokens of the viewer and the ctx_idx of every role in `g`."""
    roles = set(g.role.tolist())
    if any(r.startswith("pos:") for r in roles):
        n = 1 + max((int(r[4:]) for r in roles if r.startswith("pos:")), default=-1)
        return [f"pos {i}" for i in range(n)], {f"pos:{i}": i for i in range(n)}
    unknown = sorted(roles - set(ROLES))
    names = list(ROLES) + unknown
    return names, {r: i for i, r in enumerate(names)}


def _site_index(site: str) -> int:
    return NODE_SITES.index(site) if site in NODE_SITES else len(NODE_SITES)


def _rows(g: CircuitGraph) -> list[tuple[int, str]]:
    """(layer, site) of every dictionary of the circuit, in the order the model computes them."""
    keys = set(zip(g.layer.tolist(), g.site.tolist()))
    return sorted(keys, key=lambda k: (k[0], _site_index(k[1]), k[1]))


def _downstream(layer: int, site: str) -> list[tuple[int, str]]:
    """The consecutive sites that read a node of (layer, site) (the inverse of edges' upstream)."""
    if site == "resid":
        return [(layer, "attn"), (layer, "transcoder"), (layer + 1, "resid")]
    if site == "attn":
        return [(layer, "transcoder"), (layer + 1, "resid")]
    return [(layer + 1, "resid")]


def _clerp(site: str, layer: int, feature: int, role: str) -> str:
    what = "error" if feature == ERROR else f"#{feature}"
    return f"{SITE_LABEL.get(site, site)} L{layer} {what} @ {role}"


def _slug(g: CircuitGraph, tasks: list[str], model: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(_py(g.attrs), sort_keys=True, default=str).encode())
    for arr in (g.ie, g.selected, g.layer, g.feature, g.edge_weight):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\0".join(g.role.tolist() + g.site.tolist()).encode())
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{'+'.join(tasks) or 'circuit'}-{model}").strip("-")
    return f"{name}-{h.hexdigest()[:8]}"


def weight_scale(weights: np.ndarray) -> int:
    """k such that max |weight| · 10^k lies in [10, 100) (0 for no or zero weights)."""
    top = float(np.max(np.abs(weights))) if len(weights) else 0.0
    return 1 - math.floor(math.log10(top)) if top > 0 and math.isfinite(top) else 0


# ---- circuit-tracer JSON ----------------------------------------------------------------------
def attribution_graph(g: CircuitGraph, node_threshold: float = NODE_THRESHOLD,
                      edge_threshold: float = EDGE_THRESHOLD, slug: str | None = None) -> dict:
    """The attribution-graph document (a dict ready for json.dumps) of the selected nodes of `g`,
    pruned by influence on the metric."""
    tokens, ctx = _positions(g)
    rows = _rows(g)
    row_of = {k: r for r, k in enumerate(rows)}
    keep = np.flatnonzero(g.selected)  # graph node j = g's node keep[j]; the metric is node len(keep)
    out = len(keep)
    local = np.full(g.n_nodes, -1, dtype=np.int64)
    local[keep] = np.arange(out)
    both = (local[g.edge_src] >= 0) & (local[g.edge_dst] >= 0)
    src, dst = local[g.edge_src[both]], local[g.edge_dst[both]]
    w = g.edge_weight[both].astype(np.float64)
    # links into the metric: nodes of sites whose output also reaches it around the circuit
    present = set(rows)
    exits = np.array([any(k not in present for k in _downstream(int(g.layer[i]), str(g.site[i]))) for i in keep],
                     dtype=bool)
    carried = np.bincount(src, weights=w, minlength=out)
    direct = g.ie[keep].astype(np.float64) - carried
    to_out = np.flatnonzero(exits & (direct != 0))
    src = np.concatenate([src, to_out])
    dst = np.concatenate([dst, np.full(len(to_out), out)])
    w = np.concatenate([w, direct[to_out]])
    p = prune(out + 1, src, dst, w, out, node_threshold, edge_threshold)

    attrs = {k: _py(v) for k, v in g.attrs.items()}
    tasks = attrs.get("tasks") or []
    tasks = [tasks] if isinstance(tasks, str) else [str(t) for t in tasks]
    model = str(attrs.get("model", "unknown"))
    metric = str(attrs.get("metric", "metric"))
    power = weight_scale(w[p.edge_mask])
    scale = 10.0 ** power

    ids: dict[int, str] = {}
    nodes = []
    for j in np.flatnonzero(p.node_mask[:out]).tolist():
        i = int(keep[j])
        site, layer, role, feat = str(g.site[i]), int(g.layer[i]), str(g.role[i]), int(g.feature[i])
        row = row_of[(layer, site)]
        ids[j] = f"{row}_{feat}_{ctx[role]}"
        nodes.append({
            "node_id": ids[j], "jsNodeId": ids[j], "feature": feat, "layer": str(row), "ctx_idx": ctx[role],
            "feature_type": (ERROR_TYPES if feat == ERROR else FEATURE_TYPES).get(site, site),
            "clerp": _clerp(site, layer, feat, role), "influence": float(p.cumulative[j]),
            "activation": float(g.act[i]), "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": 0, "site": site, "model_layer": layer, "role": role,
            "ie": _round(float(g.ie[i]) * scale), "icl_feature": feat,
        })
    if nodes:
        m_full = attrs.get("m_full")
        prob = math.exp(min(float(m_full), 0.0)) if isinstance(m_full, (int, float)) else 0.0
        logit_ctx = len(tokens) - 1 if tokens[0].startswith("pos ") else ctx.get("arrow", 0)
        ids[out] = f"{len(rows)}_0_{logit_ctx}"
        nodes.append({
            "node_id": ids[out], "jsNodeId": ids[out], "feature": 0, "layer": str(len(rows)), "ctx_idx": logit_ctx,
            "feature_type": "logit", "clerp": f'Output "{metric}" (p={prob:.3f})', "influence": None,
            "activation": None, "token_prob": prob, "is_target_logit": True, "run_idx": 0, "reverse_ctx_idx": 0,
        })
        for c in sorted({n["ctx_idx"] for n in nodes}):
            nodes.append({
                "node_id": f"E_{c}", "jsNodeId": f"E_{c}", "feature": c, "layer": "E", "ctx_idx": c,
                "feature_type": "embedding", "clerp": f"column: {tokens[c]} tokens", "influence": None,
                "activation": None, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            })
    links = [{"source": ids[s], "target": ids[d], "weight": _round(x * scale)}
             for s, d, x in zip(src[p.edge_mask].tolist(), dst[p.edge_mask].tolist(), w[p.edge_mask].tolist())]

    faith = attrs.get("faithfulness")
    description = f"icl circuit: {', '.join(tasks) or 'task'} on {model}, {len(keep)} nodes"
    if isinstance(faith, (int, float)):
        description += f", faithfulness {faith:.3f}"
    unit = f"1e{-power} nats of {metric}" if power else f"nats of {metric}"
    metadata = {
        "slug": slug or _slug(g, tasks, model),
        "scan": model,
        "transcoder_list": [],
        "prompt": g.prompts[0] if g.prompts else "",
        "prompt_tokens": tokens,
        "node_threshold": float(node_threshold),
        "schema_version": 1,
        "edge_threshold": float(edge_threshold),
        "row_labels": [f"L{layer} {SITE_LABEL.get(site, site)}" for layer, site in rows],
        "weight_unit": unit,
        "weight_scale": scale,
        "info": {"description": description, "generator": {"name": "icl circuit", "url": ""},
                 "pruning": f"{int(p.node_mask[:out].sum())} of {out} circuit nodes and {int(p.edge_mask.sum())} of "
                            f"{len(w)} edges kept (node influence {node_threshold}, edge influence {edge_threshold})"},
        "icl": {k: v for k, v in attrs.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))},
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def _round(x: float) -> float:
    """x to 5 significant digits (the JSON stays small; the viewer shows 3 decimals)."""
    return float(f"{x:.5g}")


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
