"""collect: the task vector layer sweep (SPEC §4) and activation mass by role (§8).

Figures: the sweep (mean over tasks of the 0-shot + TV loss and accuracy per layer, beside the
0-shot and few-shot levels), and per task × layer the share of the 0-shot → few-shot loss gap
that the task vector closes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icl_cli.report.base import Figure, Renderer, Section, Table, fmt, register

ROLE_NAMES = ("none", "prompt", "input", "arrow", "output", "newline")


def read_sweep(path: Path) -> tuple[list[int], dict[str, dict]]:
    """(layers, task -> {sweep metric -> float | [L], best_layer, mass: {sae key: [6, d_sae]}})."""
    import h5py

    with h5py.File(path, "r") as f:
        layers = [int(x) for x in f["layers"][()]]
        tasks = {}
        for name, g in f["tasks"].items():
            row = {k: (v[()].tolist() if v.shape else float(v[()])) for k, v in g["sweep"].items()}
            row["best_layer"] = int(g.attrs["best_layer"])
            row["mass"] = {k: v[()] for k, v in g["mass"].items()} if "mass" in g else {}
            tasks[name] = row
    return layers, tasks


def gap_closed(t: dict) -> np.ndarray:
    """[L] share of the 0-shot → few-shot nll gap closed by adding the TV: (zs − tv)/(zs − fs)."""
    gap = t["zero_shot_nll"] - t["few_shot_nll"]
    return (t["zero_shot_nll"] - np.asarray(t["tv_nll"])) / (gap if abs(gap) > 1e-9 else np.nan)


@register("collect")
class CollectRenderer(Renderer):
    def build(self, art, out: Path | None) -> Section:
        layers, tasks = read_sweep(art.file("collect.h5"))
        names = list(tasks)
        mean = lambda k: np.mean([tasks[t][k] for t in names], axis=0)  # noqa: E731
        best = [tasks[t]["best_layer"] for t in names]
        common = max(set(best), key=best.count)
        summary = {"layers": layers, "n_tasks": len(names), "most_common_best_layer": common,
                   "mean": {k: np.asarray(mean(k)).tolist() for k in ("zero_shot_nll", "few_shot_nll", "tv_nll", "tv_acc",
                                                                      "zero_shot_acc", "few_shot_acc")},
                   "best_layer": dict(zip(names, best))}
        j = layers.index(common)
        sec = Section(art.key, art.step, f"Task vectors and the layer sweep ({art.params.get('model')})", summary)
        sec.notes.append(f"{len(names)} tasks, {art.params.get('n_shot')}-shot prompts, {art.params.get('n_prompts')} per task "
                         f"vector; the layer where most tasks' task vectors work best is {common}: mean nll 0-shot "
                         f"{summary['mean']['zero_shot_nll']:.3f} → with the TV {summary['mean']['tv_nll'][j]:.3f} "
                         f"(few-shot {summary['mean']['few_shot_nll']:.3f}).")
        sweep = self._sweep_table(layers, tasks)
        sweep.terminal = False  # the terminal gets it through Fit: the table, or a compact heatmap when too wide
        sec.tables.append(sweep)
        sec.terminal.append(self._sweep_terminal(sweep, layers, tasks))
        sec.tables += self._mass_tables(tasks)
        if out is not None:
            sec.figures.append(self._sweep_figure(art, layers, tasks, out))
            sec.figures.append(self._gap_figure(art, layers, tasks, out))
        return sec

    @staticmethod
    def _sweep_table(layers, tasks) -> Table:
        rows = []
        for t, r in tasks.items():
            cells = [fmt(v, 2) + ("*" if l == r["best_layer"] else "") for l, v in zip(layers, r["tv_nll"])]
            rows.append([t, fmt(r["zero_shot_nll"], 2), *cells, fmt(r["few_shot_nll"], 2)])
        return Table("nll of 0-shot prompts with the task vector added at resid_pre[layer] (* = best layer)",
                     ["task", "0-shot", *[f"layer {l}" for l in layers], "few-shot"], rows,
                     caption="nll: summed over the first answer tokens, nats; held-out queries")

    @staticmethod
    def _sweep_terminal(table: Table, layers, tasks):
        """The sweep table when it fits the terminal, else one shaded block per layer (share of the
        0-shot → few-shot gap closed) with the best layer starred and its nll beside."""
        from icl_cli.report.terminal import Fit, compact_heatmap

        names = list(tasks)
        gap = np.stack([gap_closed(tasks[t]) for t in names])
        best = [layers.index(tasks[t]["best_layer"]) if tasks[t]["best_layer"] in layers else None for t in names]
        extra = {"best": [str(tasks[t]["best_layer"]) for t in names],
                 "0-shot": [fmt(tasks[t]["zero_shot_nll"], 2) for t in names],
                 "+TV": [fmt(tasks[t]["tv_nll"][b], 2) if b is not None else "–" for t, b in zip(names, best)],
                 "few": [fmt(tasks[t]["few_shot_nll"], 2) for t in names]}
        narrow = compact_heatmap("share of the 0-shot → few-shot nll gap closed by the task vector at resid_pre[layer]",
                                 np.clip(gap, 0, 1), names, layers, lo=0.0, hi=1.0, marks=best, extra=extra,
                                 caption="columns: layers; best: the best layer, 0-shot / +TV (at the best layer) / few: "
                                         "nll in nats on held-out queries;")
        return Fit(table.to_rich(), narrow)

    @staticmethod
    def _mass_tables(tasks) -> list[Table]:
        keys = sorted({k for r in tasks.values() for k in r["mass"]})
        out = []
        for key in keys:
            rows = []
            for t, r in tasks.items():
                if key in r["mass"]:
                    per_role = r["mass"][key].sum(-1)
                    share = 100 * per_role / (per_role.sum() or 1.0)
                    rows.append([t, *(f"{v:.1f}" for v in share)])
            out.append(Table(f"activation mass by token role, % of all features of SAE {key[:12]}",
                             ["task", *ROLE_NAMES], rows))
        return out

    @staticmethod
    def _sweep_figure(art, layers, tasks, out: Path) -> Figure:
        from icl_cli.report.figures import plt, save

        p = plt()
        fig, axes = p.subplots(1, 2, figsize=(10, 3.8))
        x = np.asarray(layers)
        for ax, metric, unit in ((axes[0], "nll", "nll of the answer (nats)"), (axes[1], "acc", "first-token accuracy")):
            for t in tasks.values():
                ax.plot(x, t[f"tv_{metric}"], color="tab:blue", alpha=0.15, lw=0.8)
            m = lambda k: np.mean([t[k] for t in tasks.values()], axis=0)  # noqa: E731
            ax.plot(x, m(f"tv_{metric}"), color="tab:blue", lw=2.2, marker="o", label="0-shot + task vector (added)")
            ax.plot(x, m(f"tv_replace_{metric}"), color="tab:purple", lw=1.5, marker="s", ms=4, ls="--",
                    label="0-shot, resid replaced by TV")
            ax.axhline(m(f"zero_shot_{metric}"), color="tab:red", ls=":", lw=1.5, label="0-shot")
            ax.axhline(m(f"few_shot_{metric}"), color="tab:green", ls=":", lw=1.5, label=f"{art.params.get('n_shot')}-shot")
            ax.set_xlabel("layer l (task vector added at resid_pre[l])")
            ax.set_ylabel(unit)
            ax.set_xticks(x[::max(1, -(-len(x) // 16))])  # at most 16 labelled layers
        axes[1].set_ylim(-0.02, 1.02)
        axes[0].set_title(f"Task vector layer sweep: mean over {len(tasks)} tasks (thin: each task)")
        axes[1].set_title("accuracy on held-out queries")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, bbox_to_anchor=(0.5, 0.0))
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        files = save(fig, out, f"collect-{art.key[:8]}-layer-sweep")
        return Figure("Task vector layer sweep", "Mean over tasks of the held-out 0-shot loss and accuracy with the task "
                      "vector of each layer added at the arrow, against the 0-shot and few-shot levels (SPEC §4).", files)

    @staticmethod
    def _gap_figure(art, layers, tasks, out: Path) -> Figure:
        from icl_cli.report.figures import heatmap, heatmap_size, plt, save, task_label

        from icl_cli.report.figures import group_order, group_separators, tick_size

        p = plt()
        names = [list(tasks)[i] for i in group_order(list(tasks))]
        data = np.stack([gap_closed(tasks[t]) for t in names])
        labels = [task_label(t) for t in names]
        w, h = heatmap_size(len(names), len(layers), max(len(s) for s in labels))
        fig, ax = p.subplots(figsize=(w, h))
        heatmap(ax, data, labels, [str(l) for l in layers], cmap="RdBu", center=0.0,
                cbar="share of the 0-shot → few-shot gap closed", annotate=len(layers) <= 16 and len(names) <= 30)
        ax.tick_params(axis="x", labelsize=tick_size(len(layers), 0.6 * w))
        group_separators(ax, names)
        ax.set_xlabel("layer l (resid_pre[l])")
        ax.set_title("Task vector effect per task and layer (lines: task groups)")
        files = save(fig, out, f"collect-{art.key[:8]}-gap-closed")
        return Figure("Task vector effect per task and layer",
                      "(nll 0-shot − nll with the TV) / (nll 0-shot − nll few-shot): 1 (blue) means the task vector "
                      "recovers the few-shot loss, 0 (white) no effect, red that it makes the loss worse; tasks grouped "
                      "as in the paper, white lines between groups.", files)
