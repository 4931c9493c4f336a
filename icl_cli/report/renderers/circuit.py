"""circuit: a sparse feature circuit (SPEC §7): its faithfulness sweep and its graph.

Figures: faithfulness against the number of feature nodes kept (the threshold sweep of node
selection, with 0.8 and the chosen set marked; in-sample: measured on the prompts the effects
were computed on; held-out curves are the faithfulness step's), and the graph of the strongest selected nodes:
drawn by Graphviz when the ``dot`` program is installed, else laid out here (columns: layer and
site in the order they act; rows: token role; size: |IE|; colour: sign).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from icl_cli.report.base import Figure, Renderer, Section, Table, fmt, register

MAX_DRAWN = 40
"""Nodes drawn in the graph figure (the selected ones with the largest |IE|)."""
SITE_ORDER = {"resid": 0, "attn": 1, "transcoder": 2}
ROLE_ORDER = ("prompt", "input", "output", "newline", "arrow")


def size_at(n_nodes: np.ndarray, faith: np.ndarray, level: float = 0.8) -> int | None:
    """The smallest swept node count whose faithfulness reaches ``level`` (None if none does)."""
    ok = [int(n) for n, f in zip(n_nodes, faith) if f >= level]
    return min(ok) if ok else None


def node_label(site: str, layer: int, role: str, feature: int) -> str:
    return f"{site}{layer} {role} {'err' if feature < 0 else feature}"


@register("circuit")
class CircuitRenderer(Renderer):
    version = 3

    def build(self, art, out: Path | None) -> Section:
        from icl_cli.circuit.graph import read_h5

        g = read_h5(art.file("circuit.h5"))
        a = g.attrs
        tasks = ", ".join(a.get("tasks") or [])
        feat = g.feature >= 0
        n_feat = int(feat.sum())
        sel = g.selected & feat
        at08 = size_at(g.sweep_n_nodes, g.sweep_faithfulness, 0.8)
        summary = {"tasks": a.get("tasks"), "n_nodes": g.n_nodes, "n_feature_nodes": n_feat, "n_selected": int(sel.sum()),
                   "n_edges": g.n_edges, "faithfulness": a.get("faithfulness"), "threshold": a.get("threshold"),
                   "nodes_at_0.8": at08, "sweep": {"n_nodes": g.sweep_n_nodes.tolist(), "faithfulness": g.sweep_faithfulness.tolist()}}
        sec = Section(art.key, art.step, f"Circuit of {tasks} ({a.get('model')})", summary)
        if at08 is not None:
            size = f"with {at08} nodes"
        else:
            swept = int(np.max(g.sweep_n_nodes)) if len(g.sweep_n_nodes) else 0
            best = float(np.max(g.sweep_faithfulness)) if len(g.sweep_faithfulness) else float("nan")
            size = f"not reached within {swept} (F reached {best:.2f})"
        sec.notes.append(f"{int(sel.sum())} of {n_feat} feature nodes selected (in-sample faithfulness "
                         f"{fmt(a.get('faithfulness'), 2)} at |IE| ≥ {float(a.get('threshold') or 0):.3g}); {g.n_edges} edges; "
                         f"in-sample, 0.8 faithfulness is reached {size}. Metric {a.get('metric')}: m(full) "
                         f"{fmt(a.get('m_full'), 3)}, m(all ablated) {fmt(a.get('m_empty'), 3)}. Circuit sizes on "
                         "held-out prompts: the faithfulness section (icl ablate --circuit).")
        order = np.argsort(-np.abs(g.ie))
        rows = [[g.site[i], str(int(g.layer[i])), g.role[i], "error" if g.feature[i] < 0 else str(int(g.feature[i])),
                 f"{float(g.ie[i]):+.3g}", f"{float(g.act[i]):.3g}", "yes" if g.selected[i] else ""] for i in order[:15]]
        sec.tables.append(Table("nodes with the largest indirect effect", ["site", "layer", "role", "feature", "IE", "act",
                                                                          "in circuit"], rows, align="lrlrrrl"))
        if out is not None:
            sec.figures.append(self._sweep(art, g, at08, out))
            sec.figures.append(self._graph(art, g, out))
        return sec

    @staticmethod
    def _sweep(art, g, at08, out: Path) -> Figure:
        from icl_cli.report.figures import plain_log_axis, plt, save

        p = plt()
        fig, ax = p.subplots(figsize=(7, 4))
        n = np.maximum(g.sweep_n_nodes, 0.8)  # 0 nodes drawn at the left edge of the log axis
        order = np.argsort(n)
        ax.plot(n[order], g.sweep_faithfulness[order], marker="o", color="tab:blue", label="keep the top-n nodes (by |IE|)")
        ax.axhline(0.8, color="tab:gray", ls=":", label="faithfulness 0.8")
        ax.axhline(1.0, color="black", lw=0.8)
        chosen = int((g.selected & (g.feature >= 0)).sum())
        ax.axvline(max(chosen, 0.8), color="tab:green", ls="--", label=f"selected: {chosen} nodes")
        if at08 is not None:
            f08 = float(g.sweep_faithfulness[list(g.sweep_n_nodes).index(at08)])
            ax.scatter([max(at08, 0.8)], [f08], s=70, color="tab:red", zorder=5, label=f"≥ 0.8 first at {at08} nodes")
        plain_log_axis(ax, "x")
        ax.set_xlabel("feature nodes kept (others ablated)")
        ax.set_ylabel("faithfulness F = (m(C) − m(∅)) / (m(M) − m(∅))")
        ax.set_title(f"Faithfulness of the circuit of {', '.join(g.attrs.get('tasks') or [])} (in-sample)")
        ax.legend(loc="lower right", fontsize=8)
        files = save(fig, out, f"circuit-{art.key[:8]}-faithfulness")
        return Figure("Faithfulness sweep (in-sample)", "Faithfulness of the top-n feature nodes (the rest ablated to the "
                      "baseline) for the node counts tried while selecting the circuit, on the prompts its effects were "
                      "computed on (SPEC §7).", files)

    def _graph(self, art, g, out: Path) -> Figure:
        idx = self._drawn(g)
        if shutil.which("dot"):
            files = self._graphviz(art, g, idx, out)
            if files:
                return Figure("Circuit graph (Graphviz)", f"The {len(idx)} selected nodes with the largest |IE| and the edges "
                              "between them; blue supports the metric, red opposes it.", files)
        return self._drawn_graph(art, g, idx, out)

    @staticmethod
    def _drawn(g) -> np.ndarray:
        sel = np.nonzero(g.selected)[0]
        return sel[np.argsort(-np.abs(g.ie[sel]))][:MAX_DRAWN]

    @staticmethod
    def _graphviz(art, g, idx: np.ndarray, out: Path) -> list[Path]:
        keep = {int(i): k for k, i in enumerate(idx)}
        wmax = float(np.abs(g.edge_weight).max()) if g.n_edges else 1.0
        lines = ["digraph circuit {", "rankdir=LR; newrank=true; nodesep=0.15; ranksep=0.9;",
                 "node [shape=box, style=filled, fontname=Helvetica, fontsize=10];"]
        # one rank per (layer, site), in the order they act, tied together by an invisible spine
        cols = sorted({(int(g.layer[i]), SITE_ORDER.get(g.site[i], 3), g.site[i]) for i in keep})
        for c, (layer, _, site) in enumerate(cols):
            lines.append(f'c{c} [label="{site} {layer}", shape=plaintext, style="", fontsize=11];')
            members = [f"n{k}" for i, k in keep.items() if int(g.layer[i]) == layer and g.site[i] == site]
            lines.append("{rank=same; " + f"c{c}; " + "; ".join(members) + ";}")
        lines += [f"c{c} -> c{c + 1} [style=invis];" for c in range(len(cols) - 1)]
        for i, k in keep.items():
            colour = "#9ecae1" if g.ie[i] >= 0 else "#fcae91"
            shape = "diamond" if g.feature[i] < 0 else "box"
            feat = "error" if g.feature[i] < 0 else f"#{int(g.feature[i])}"
            lines.append(f'n{k} [label="{feat} @ {g.role[i]}\\nIE {g.ie[i]:+.3g}", fillcolor="{colour}", shape={shape}];')
        for s_, d, w in zip(g.edge_src, g.edge_dst, g.edge_weight):
            if int(s_) in keep and int(d) in keep:
                pen = 0.5 + 3 * abs(float(w)) / (wmax or 1.0)
                lines.append(f'n{keep[int(s_)]} -> n{keep[int(d)]} [penwidth={pen:.2f}, color="{"#3182bd" if w >= 0 else "#de2d26"}"];')
        lines.append("}")
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"circuit-{art.key[:8]}-graph"
        dot = stem.with_suffix(".dot")
        dot.write_text("\n".join(lines))
        try:
            for fmt_ in ("png", "svg"):
                subprocess.run(["dot", f"-T{fmt_}", "-Gdpi=110" if fmt_ == "png" else "-Gdpi=72", str(dot), "-o",
                                str(stem.with_suffix("." + fmt_))], check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return []
        return [stem.with_suffix(".png"), stem.with_suffix(".svg"), dot]

    @staticmethod
    def _drawn_graph(art, g, idx: np.ndarray, out: Path) -> Figure:
        from icl_cli.report.figures import plt, save

        p = plt()
        cols = sorted({(int(g.layer[i]), SITE_ORDER.get(g.site[i], 3)) for i in idx})
        roles = [r for r in ROLE_ORDER if r in set(g.role[idx])] + sorted(set(g.role[idx]) - set(ROLE_ORDER))
        xpos = {c: k for k, c in enumerate(cols)}
        cell = {int(i): (xpos[(int(g.layer[i]), SITE_ORDER.get(g.site[i], 3))], roles.index(g.role[i])) for i in idx}
        members: dict = {}
        for i, c in cell.items():
            members.setdefault(c, []).append(i)
        # a grid inside each (site/layer, role) cell, strongest first, labels beside the nodes: at most
        # two sub-columns (room for a label each), as many rows as that needs (6 at least)
        per_of = {c: max(6, -(-len(ids) // 2)) for c, ids in members.items()}
        pos = {}
        for (x, y), ids in members.items():
            per = per_of[(x, y)]
            ids = sorted(ids, key=lambda i: -abs(float(g.ie[i])))
            n_sub = -(-len(ids) // per)
            rows_used = min(len(ids), per)
            for k, i in enumerate(ids):
                c, r = divmod(k, per)
                dx = -0.4 + 0.85 * c / n_sub if n_sub > 1 else -0.1
                dy = -0.36 + 0.72 * r / (rows_used - 1) if rows_used > 1 else 0.0
                pos[i] = (x + dx, y + dy)
        deepest = max((min(len(v), per_of[c]) for c, v in members.items()), default=1)
        fig, ax = p.subplots(figsize=(min(11.8, max(7, 1.5 * len(cols) + 2.5)), max(4, (0.9 + 0.22 * deepest) * len(roles) + 1.5)))
        wmax = float(np.abs(g.edge_weight).max()) if g.n_edges else 1.0
        for s, d, w in zip(g.edge_src, g.edge_dst, g.edge_weight):
            if int(s) in pos and int(d) in pos:
                (x0, y0), (x1, y1) = pos[int(s)], pos[int(d)]
                ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="-|>", mutation_scale=9, shrinkA=6, shrinkB=6, color="tab:blue" if w >= 0 else "tab:red",
                                                                     alpha=0.25 + 0.6 * abs(float(w)) / (wmax or 1.0), lw=0.6 + 2 * abs(float(w)) / (wmax or 1.0)))
        imax = float(np.abs(g.ie[idx]).max()) if len(idx) else 1.0
        for i in idx:
            x, y = pos[int(i)]
            size = 25 + 250 * abs(float(g.ie[i])) / (imax or 1.0)
            ax.scatter([x], [y], s=size, marker="D" if g.feature[i] < 0 else "o", color="tab:blue" if g.ie[i] >= 0 else "tab:red",
                       edgecolor="black", lw=0.5, zorder=3)
            ax.annotate("err" if g.feature[i] < 0 else str(int(g.feature[i])), (x, y), textcoords="offset points", xytext=(7, 0),
                        ha="left", va="center", fontsize=7, zorder=4,
                        bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.7))
        ax.set_xticks(range(len(cols)), labels=[f"{['resid', 'attn', 'transc.', '?'][s]} {l}" for l, s in cols], rotation=45,
                      ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(roles)), labels=roles)
        ax.set_xlim(-0.6, len(cols) - 0.4)
        ax.set_ylim(-0.6, len(roles) - 0.4)
        ax.set_xlabel("site and layer (in the order they act)")
        ax.set_ylabel("token role")
        ax.grid(False)
        ax.set_title(f"Circuit of {', '.join(g.attrs.get('tasks') or [])}: the {len(idx)} strongest selected nodes\n"
                     "(size: |IE|; blue supports the metric, red opposes it; ◆ error nodes; arrows: edges)", fontsize=10)
        files = save(fig, out, f"circuit-{art.key[:8]}-graph")
        return Figure("Circuit graph", f"The {len(idx)} selected nodes with the largest |IE| and the edges between them, laid "
                      "out by site/layer (columns) and token role (rows); Graphviz is not installed, so the layout is drawn "
                      "with matplotlib.", files)
