"""faithfulness: the faithfulness curves of circuits and their cross-task matrix (SPEC §7).

F(C) = (m(C) − m(∅)) / (m(M) − m(∅)). Curves: F when only the top-n feature nodes (by |IE|) are
kept, and when the top-n are ablated, against n. The headline sizes are read off the curves by
interpolating in log n between the measured points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from icl_cli.report.base import Figure, Renderer, Section, Table, fmt, register


def crossing(n: list[int], f: list[float], level: float, rising: bool = True) -> float | None:
    """The n where curve f first reaches ``level`` (≥ when rising, ≤ otherwise), interpolated
    linearly in log n between the two measured points around it; None if it never does."""
    for i, v in enumerate(f):
        if (v >= level) if rising else (v <= level):
            if i == 0 or n[i - 1] <= 0:
                return float(n[i])
            lo, hi, flo = n[i - 1], n[i], f[i - 1]
            t = (level - flo) / (v - flo) if v != flo else 1.0
            return float(math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo))))
    return None


def _n(x: float | None) -> str:
    return "not reached" if x is None else f"≈ {x:.0f}"


@register("faithfulness")
class FaithfulnessRenderer(Renderer):
    def build(self, art, out: Path | None) -> Section:
        data = json.loads(art.file("faithfulness.json").read_text(encoding="utf-8"))
        curves = data.get("curves", {})
        rows, keep08, half = [], {}, {}
        for key, c in curves.items():
            keep08[c["task"]] = crossing(c["n"], c["keep"], 0.8)
            half[c["task"]] = crossing(c["n"], c["ablate"], 0.5, rising=False)
            rows.append([c["task"], str(c["n_selected"]), _n(keep08[c["task"]]), _n(half[c["task"]]), key[:12]])
        tasks = [c["task"] for c in curves.values()]
        summary = {"tasks": tasks, "nodes_keep_0.8": keep08, "nodes_ablate_half": half, "curves": curves}
        sec = Section(art.key, art.step, f"Faithfulness of the circuits of {', '.join(tasks)}", summary)
        sec.tables.append(Table("faithfulness read off the curves", ["task", "selected nodes", "top nodes for F = 0.8",
                                                                     "top nodes whose ablation halves F", "circuit"], rows,
                                align="lrrrl", caption="node counts interpolated in log n between measured points"))
        if curves:
            sec.summary["headline"] = [
                {"finding": "Circuit size at 0.8 faithfulness (top nodes kept)",
                 "ours": "; ".join(f"{t} {_n(v)}" for t, v in keep08.items()) + " nodes",
                 "paper": "about 1000 nodes keep about 0.8 (Gemma-1 2B)"},
                {"finding": "Top nodes whose ablation halves faithfulness",
                 "ours": "; ".join(f"{t} {_n(v)}" for t, v in half.items()) + " nodes",
                 "paper": "a few hundred"}]
        cross = data.get("cross_task")
        if cross:
            m = np.array(cross["matrix"], dtype=float)
            sec.tables.append(Table("cross-task: F of the column's task with the row's circuit ablated",
                                    ["circuit of", *cross["cols"]], [[r, *(fmt(v, 2) for v in row)] for r, row in zip(cross["rows"], m)]))
        if out is not None and curves:
            sec.figures.append(self._curves(art, curves, out))
            if cross and len(cross["rows"]) > 1:
                sec.figures.append(self._cross(art, cross, out))
        return sec

    @staticmethod
    def _curves(art, curves: dict, out: Path) -> Figure:
        from icl_cli.report.figures import plain_log_axis, plt, save, task_label

        p = plt()
        fig, ax = p.subplots(figsize=(7.5, 4.2))
        colours = p.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, c in enumerate(curves.values()):
            n = np.maximum(np.asarray(c["n"], dtype=float), 0.7)  # n = 0 at the left edge of the log axis
            col = colours[k % len(colours)]
            ax.plot(n, c["keep"], color=col, marker="o", ms=3.5, label=f"{task_label(c['task'])}: keep the top n")
            ax.plot(n, c["ablate"], color=col, marker="s", ms=3.5, ls="--", label=f"{task_label(c['task'])}: ablate the top n")
        ax.axhline(0.8, color="tab:gray", ls=":", lw=1)
        ax.axhline(0.5, color="tab:gray", ls=":", lw=1)
        ax.text(0.72, 0.81, "0.8", color="tab:gray", fontsize=8, va="bottom")
        ax.text(0.72, 0.51, "0.5", color="tab:gray", fontsize=8, va="bottom")
        plain_log_axis(ax, "x")
        ax.set_xlabel("top feature nodes n (by |IE|; 0 drawn at the left edge)")
        ax.set_ylabel("faithfulness F")
        ax.set_title("Faithfulness curves")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        files = save(fig, out, f"faithfulness-{art.key[:8]}-curves")
        return Figure("Faithfulness curves", "F = (m(C) − m(∅)) / (m(M) − m(∅)) when only the top-n feature nodes are kept "
                      "(solid) or when they are ablated (dashed), for each circuit (SPEC §7).", files)

    @staticmethod
    def _cross(art, cross: dict, out: Path) -> Figure:
        from icl_cli.report.figures import heatmap, heatmap_size, plt, save, task_label

        p = plt()
        rows, cols = [task_label(t) for t in cross["rows"]], [task_label(t) for t in cross["cols"]]
        fig, ax = p.subplots(figsize=heatmap_size(len(rows), len(cols), max(map(len, rows)), max(map(len, cols))))
        heatmap(ax, np.array(cross["matrix"], dtype=float), rows, cols, cmap="viridis", vmin=0, vmax=1,
                cbar="faithfulness F of the measured task")
        ax.set_xlabel("task measured")
        ax.set_ylabel("circuit ablated")
        ax.set_title("Cross-task circuit ablation")
        files = save(fig, out, f"faithfulness-{art.key[:8]}-cross-task")
        return Figure("Cross-task circuit ablation", "Faithfulness on the column's task when the row's circuit (its selected "
                      "feature nodes) is ablated: low values mean that circuit matters for that task.", files)
