"""faithfulness: the faithfulness curves of circuits and their cross-task matrix (SPEC §7).

F(C) = (m(C) − m(∅)) / (m(M) − m(∅)). Curves: F when only the top-n feature nodes (by signed IE,
or |IE| when the artifact says so) are kept, and when the top-n are ablated, against n, on
held-out prompts (artifacts made with --in-sample, and those of format 1, are labelled
in-sample). The headline sizes are read off the curves by interpolating in log n between the
measured points; a curve that stops before reaching the level says how far it got ("not reached
within N (F reached x)").
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


def size_text(x: float | None, c: dict, rising: bool) -> str:
    """``≈ n`` nodes, or how far a curve that never reached the level got (never a bare "not reached")."""
    if x is not None:
        return f"≈ {x:.0f}"
    f = c["keep"] if rising else c["ablate"]
    best = max(f) if rising else min(f)
    cut = c.get("cut_off", c.get("n_graph") is None or c["n"][-1] < c["n_graph"])
    within = f"within {c['n'][-1]}" if cut else f"by all {c['n'][-1]} graph nodes"
    return f"not reached {within} (F reached {best:.2f})"


def prompts_of(data: dict) -> str:
    """held-out | in-sample (format-1 artifacts measured on the circuit's own prompts)."""
    return data.get("prompts", "in-sample")


def size_match(sizes: dict[str, float | None], within: float, paper: str, at_least: float = 0.0) -> str:
    """yes: every circuit reaches the level with between ``at_least`` and ``within`` nodes (the
    paper's range); no: none reaches it, or every one that does needs far fewer nodes than
    ``at_least``; partly: anything between."""
    from icl_cli.report.headline import judge

    got = {t: v for t, v in sizes.items() if v is not None}
    if not sizes:
        return judge("cannot detect", "no curve")
    in_range = {t: v for t, v in got.items() if at_least <= v <= within}
    if len(in_range) == len(sizes):
        level = "yes"
    elif not got or (not in_range and all(v < at_least for v in got.values())):
        level = "no"
    else:
        level = "partly"
    reached = ", ".join(f"{t} ≈ {v:.0f}" for t, v in got.items()) or "none"
    fewer = "; far fewer nodes than the paper's" if got and all(v < at_least for v in got.values()) else ""
    return judge(level, f"reached by {len(got)}/{len(sizes)} circuits ({reached}){fewer}; paper: {paper}")


@register("faithfulness")
class FaithfulnessRenderer(Renderer):
    version = 2

    def build(self, art, out: Path | None) -> Section:
        data = json.loads(art.file("faithfulness.json").read_text(encoding="utf-8"))
        curves = data.get("curves", {})
        where = prompts_of(data)
        rows, keep08, half = [], {}, {}
        text08, text_half = {}, {}
        for key, c in curves.items():
            t = c["task"]
            keep08[t] = crossing(c["n"], c["keep"], 0.8)
            half[t] = crossing(c["n"], c["ablate"], 0.5, rising=False)
            text08[t], text_half[t] = size_text(keep08[t], c, True), size_text(half[t], c, False)
            rows.append([t, str(c["n_selected"]), str(c.get("n_graph", "–")), text08[t], text_half[t], key[:12]])
        tasks = [c["task"] for c in curves.values()]
        rank = "|IE|" if data.get("rank", "abs") == "abs" else "IE"
        summary = {"tasks": tasks, "prompts": where, "nodes_keep_0.8": keep08, "nodes_ablate_half": half, "curves": curves}
        sec = Section(art.key, art.step, f"Faithfulness of the circuits of {', '.join(tasks)}", summary)
        sec.tables.append(Table(f"faithfulness read off the curves ({where} prompts; top nodes by {rank})",
                                ["task", "selected nodes", "graph nodes", "top nodes for F = 0.8",
                                 "top nodes whose ablation halves F", "circuit"], rows,
                                align="lrrrrl", caption="node counts interpolated in log n between measured points"))
        if curves:
            sec.summary["headline"] = [
                {"finding": f"Circuit size at 0.8 faithfulness (top nodes kept; {where} prompts)",
                 "ours": "; ".join(f"{t} {v}" for t, v in text08.items()) + " nodes",
                 "paper": "about 1000 nodes keep about 0.8 (Gemma-1 2B, held-out prompts)",
                 "match": size_match(keep08, 3000, "about 1000", at_least=300)},
                {"finding": f"Top nodes whose ablation halves faithfulness ({where} prompts)",
                 "ours": "; ".join(f"{t} {v}" for t, v in text_half.items()) + " nodes",
                 "paper": "a few hundred",
                 "match": size_match(half, 1000, "a few hundred", at_least=100)}]
        cross = data.get("cross_task")
        if cross:
            m = [[fmt(v, 2) if v is not None else "undefined" for v in row] for row in cross["matrix"]]
            sec.tables.append(Table(f"cross-task: F of the column's task ({where} prompts) with the row's circuit ablated",
                                    ["circuit of", *cross["cols"]], [[r, *row] for r, row in zip(cross["rows"], m)],
                                    caption="m(M): the unablated model on the column's task; m(∅): the row's whole "
                                            "graph ablated; undefined: that graph does not move the column's metric"))
        if out is not None and curves:
            sec.figures.append(self._curves(art, curves, out, where, rank))
            if cross and len(cross["rows"]) > 1:
                sec.figures.append(self._cross(art, cross, out, where))
        return sec

    @staticmethod
    def _curves(art, curves: dict, out: Path, where: str, rank: str) -> Figure:
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
        ax.set_xlabel(f"top feature nodes n (by {rank}; 0 drawn at the left edge)")
        ax.set_ylabel("faithfulness F")
        ax.set_title(f"Faithfulness curves ({where} prompts)")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        files = save(fig, out, f"faithfulness-{art.key[:8]}-curves")
        return Figure("Faithfulness curves", "F = (m(C) − m(∅)) / (m(M) − m(∅)) when only the top-n feature nodes are kept "
                      f"(solid) or when they are ablated (dashed), for each circuit, on {where} prompts (SPEC §7).", files)

    @staticmethod
    def _cross(art, cross: dict, out: Path, where: str) -> Figure:
        from icl_cli.report.figures import heatmap, heatmap_size, plt, save, task_label

        p = plt()
        rows, cols = [task_label(t) for t in cross["rows"]], [task_label(t) for t in cross["cols"]]
        fig, ax = p.subplots(figsize=heatmap_size(len(rows), len(cols), max(map(len, rows)), max(map(len, cols))))
        matrix = np.array([[np.nan if v is None else v for v in row] for row in cross["matrix"]], dtype=float)
        heatmap(ax, matrix, rows, cols, cmap="viridis", cbar="faithfulness F of the measured task (colours: its range)")
        ax.set_xlabel("task measured")
        ax.set_ylabel("circuit ablated")
        ax.set_title(f"Cross-task circuit ablation ({where} prompts)")
        files = save(fig, out, f"faithfulness-{art.key[:8]}-cross-task")
        return Figure("Cross-task circuit ablation", "Faithfulness on the column's task when the row's circuit (its selected "
                      "feature nodes) is ablated: low values mean that circuit matters for that task.", files)
