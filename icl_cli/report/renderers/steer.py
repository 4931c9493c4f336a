"""steer: the executor / detector steering heatmaps and negative steering (SPEC §6).

Figures: the heatmap of relative loss decrease (task × feature), raw and row-normalised (each
row divided by its max, cells < 0.2 set to 0, the paper's display), features grouped by the
task they help most and each task's executors (detectors) outlined; for negative steering, the
accuracy and loss of each task against the subtracted scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icl_cli.report.base import Figure, Renderer, Section, register

MAX_COLUMNS = 60
"""At most this many feature columns in a figure (the ones with the largest effects)."""


def specificity_match(mode: str, n_spec: int, n_sel: int, n: int) -> str:
    """The "matches the paper?" cell of a steering row: executors are task-specific (the
    normalised heatmap close to diagonal); detectors, steered at a dummy output, trigger their task."""
    from icl_cli.report.headline import judge

    what = "detectors" if mode == "detector" else "executors"
    if mode == "detector":
        level = "yes" if n_sel >= n / 2 else "partly" if n_spec >= n / 2 else "no"
        reason = f"{n_sel}/{n} tasks have {what} by the rule, {n_spec}/{n} tasks' best feature is most specific to them"
    else:
        level = "yes" if n_spec >= 0.75 * n and n_sel >= n / 2 else "partly" if n_spec >= n / 2 else "no"
        reason = f"{n_spec}/{n} tasks' best feature helps them most (diagonal), {n_sel}/{n} have {what} by the rule"
    return judge(level, reason)


@register("steer")
class SteerRenderer(Renderer):
    version = 3

    def build(self, art, out: Path | None) -> Section:
        from icl_cli.steer.heatmaps import read_h5, summary_json

        r = read_h5(art.file("steer.h5"))
        data = summary_json(art.key, r)
        if r.mode == "negative":
            return self._negative(art, r, data, out)
        what = "detectors" if r.mode == "detector" else "executors"
        summary = {k: data[k] for k in ("mode", "layer", "scale", "tasks", "features") if k in data}
        summary[what] = r.selected
        if "specificity" in data:
            summary["specificity"] = data["specificity"]
        sec = Section(art.key, art.step, f"{r.mode.capitalize()} steering heatmap at resid_pre[{r.layer}]", summary)
        n_sel = sum(1 for t in r.tasks if r.selected.get(t))
        spec = data.get("specificity")
        if spec:
            n_spec = sum(spec["specific"].values())
            sec.notes.append(f"{len(r.features)} features × {len(r.tasks)} tasks at scale {r.scale:g}. Specificity: for {n_spec} of "
                             f"{len(r.tasks)} tasks the task's best feature lowers its loss more than any other task's; "
                             f"{n_sel} tasks have {what} by the rule (effect ≥ {r.min_effect:g}, ≤ {r.max_other:g}× elsewhere).")
            summary["headline"] = [{
                "finding": f"{'Detector' if r.mode == 'detector' else 'Executor'} specificity (steering, layer {r.layer})",
                "ours": f"{n_spec}/{len(r.tasks)} tasks' best feature helps that task most; {n_sel}/{len(r.tasks)} tasks have {what} "
                        f"(mean best effect {float(r.effect.max(1).values.mean()):.2f})",
                "paper": "executors are task-specific: the row-normalised heatmap is close to diagonal (qualitative, Fig. 4)"
                         if r.mode == "executor" else "steering with a detector at its output token (layer 11, s = 25) "
                                                      "triggers its task in a 0-shot prompt (qualitative)",
                "match": specificity_match(r.mode, n_spec, n_sel, len(r.tasks))}]
        from icl_cli.steer.view import heatmap_tables

        sec.terminal += heatmap_tables(r, art.key, normalise=True)
        if out is not None and r.features and len(r.tasks):
            sec.figures.append(self._heatmap(art, r, out, normalise=False))
            sec.figures.append(self._heatmap(art, r, out, normalise=True))
        return sec

    @staticmethod
    def _heatmap(art, r, out: Path, normalise: bool) -> Figure:
        from icl_cli.report.figures import (MAX_WIDTH_IN, group_order, group_separators, heatmap, outline, outline_legend,
                                            plt, save, task_label, tick_size)
        from icl_cli.steer.heatmaps import normalise_rows
        from icl_cli.steer.view import column_order

        p = plt()
        order = group_order(r.tasks)  # rows by task group; columns grouped by the row each feature helps most
        cols = column_order(r.effect[order], MAX_COLUMNS)
        values = (normalise_rows(r.effect) if normalise else r.effect)[order][:, cols].numpy()
        tasks = [r.tasks[i] for i in order]
        feats = [str(r.features[j]) for j in cols]
        rows = [task_label(t) for t in tasks]
        room = 2.2 + 0.075 * max(len(s) for s in rows) + 1.0
        width = room + min(0.2 * len(cols), MAX_WIDTH_IN - room)
        fig, ax = p.subplots(figsize=(max(width, 6), max(3.2, 1.9 + 0.3 * len(rows))))
        label = "effect / row max (< 0.2 → 0)" if normalise else "relative loss decrease (colours: 0 to the largest)"
        # normalised rows span 0-1 by construction; raw effects get a scale from 0 to their largest value
        top = 1.0 if normalise else max(float(np.nanmax(values)) if values.size else 0.0, 1e-6)
        heatmap(ax, values, rows, feats, cmap="magma", vmin=0, vmax=top, cbar=label,
                annotate=len(cols) <= 14 and len(rows) <= 24, xrotation=90)
        ax.tick_params(axis="x", labelsize=tick_size(len(cols), width - room))
        group_separators(ax, tasks, color="tab:gray", lw=1.2)
        n_out = 0
        for i, t in enumerate(tasks):  # outline the task's executors / detectors
            own = set(r.selected.get(t, []))
            for k, j in enumerate(cols):
                if r.features[j] in own:
                    outline(ax, i, k, "tab:cyan")
                    n_out += 1
        what = "detectors" if r.mode == "detector" else "executors"
        outline_legend(ax, "tab:cyan", f"the row task's {what} ({n_out} cells)", n_out,
                       f"no task has {what} by the rule (effect ≥ {r.min_effect:g}, ≤ {r.max_other:g}× elsewhere)")
        shown = f"{len(cols)} of {len(r.features)} features" if len(cols) < len(r.features) else f"{len(cols)} features"
        where = "the dummy example's output token" if r.mode == "detector" else "the arrow"
        vec = "detector vectors" if r.mode == "detector" else "task vectors"
        ax.set_xlabel(f"SAE feature id ({shown} kept by cleaning the {vec}, grouped by the task each helps most)")
        ax.set_title(f"{r.mode.capitalize()} steering: {r.scale:g}·u_f added at {where}, resid_pre[{r.layer}]"
                     + (" — rows normalised" if normalise else ""), pad=22)
        stem = f"steer-{art.key[:8]}-{r.mode}{'-normalised' if normalise else ''}"
        files = save(fig, out, stem)
        return Figure(f"{r.mode.capitalize()} heatmap{' (row-normalised)' if normalise else ''}",
                      f"Relative loss decrease of each task's 0-shot prompts when one feature's decoder direction is added "
                      f"(SPEC §6){'; each row divided by its max, cells under 0.2 set to 0' if normalise else ''}; "
                      f"features: those kept by cleaning the {vec}. Tasks grouped as in the paper (grey lines between "
                      f"groups). Outlined (cyan): the task's {what}"
                      + ("." if n_out else f" — none: no task has {what} by the rule."), files)

    def _negative(self, art, r, data, out: Path | None) -> Section:
        from icl_cli.steer.heatmaps import negative_drop, shown_scale
        from icl_cli.steer.view import column_order, negative_table

        summary = {k: data[k] for k in ("mode", "layer", "tasks", "features", "scales", "shown_scale", "base_acc",
                                        "base_nll", "acc_drop")}
        sec = Section(art.key, art.step, f"Negative steering at resid_pre[{r.layer}], one feature at a time", summary)
        s = shown_scale(r)
        sec.terminal += negative_table(r, art.key)
        if not r.features:
            sec.notes.append("No feature was subtracted: every task's feature set is empty.")
            return sec
        drop = negative_drop(r, s)  # [F, T]
        own = [[f in r.selected.get(t, []) for t in r.tasks] for f in r.features]
        own_t = np.array(own)  # [F, T]
        d = drop.numpy()
        mean_own = float(d[own_t].mean()) if own_t.any() else float("nan")
        mean_other = float(d[~own_t].mean()) if (~own_t).any() else float("nan")
        sec.notes.append(f"{len(r.features)} features × {len(r.tasks)} tasks, each feature's direction subtracted at every "
                         f"arrow of few-shot prompts; at scale {s:.3g} the accuracy at the arrows drops by {mean_own:+.3f} "
                         f"on average where the feature is the task's own and {mean_other:+.3f} elsewhere.")
        if out is not None:
            from icl_cli.report.figures import (MAX_WIDTH_IN, group_order, group_separators, heatmap, outline,
                                                outline_legend, plain_log_axis, plt, save, task_label, tick_size)

            p = plt()
            order = group_order(r.tasks)
            cols = column_order(drop.T[order].clamp(min=0), MAX_COLUMNS)
            tasks = [r.tasks[i] for i in order]
            rows = [task_label(t) for t in tasks]
            values = drop.T[order][:, cols].numpy()
            room = 2.2 + 0.075 * max(len(x) for x in rows) + 1.0
            width = room + min(0.2 * len(cols), MAX_WIDTH_IN - room)
            fig, ax = p.subplots(figsize=(max(width, 6), max(3.2, 1.9 + 0.3 * len(rows))))
            heatmap(ax, values, rows, [str(r.features[j]) for j in cols], cmap="RdBu_r", center=0.0,
                    cbar="accuracy drop at the arrows", annotate=len(cols) <= 14 and len(rows) <= 24, xrotation=90)
            ax.tick_params(axis="x", labelsize=tick_size(len(cols), width - room))
            group_separators(ax, tasks, color="tab:gray", lw=1.2)
            n_out = 0
            for i, ti in enumerate(order):
                for k, j in enumerate(cols):
                    if own[j][ti]:
                        outline(ax, i, k, "black")
                        n_out += 1
            outline_legend(ax, "black", "a feature the row's task brought", n_out, "no shown feature is a row task's own")
            ax.set_xlabel("SAE feature id")
            ax.set_title(f"Negative steering: −{s:.3g}·u_f at every arrow, resid_pre[{r.layer}]", pad=22)
            fig.tight_layout()
            files = save(fig, out, f"steer-{art.key[:8]}-negative")
            sec.figures.append(Figure("Negative steering, feature × task", f"Accuracy drop of the next token at every arrow "
                                      f"of few-shot prompts when one feature's direction is subtracted at scale {s:.3g} "
                                      f"(SPEC §6); red: the task gets worse. Outlined: the task's own features.", files))
            fig, ax = p.subplots(figsize=(6.5, 3.6))
            acc = r.acc.numpy()  # [T, F, S]
            sc = r.scales.numpy()
            own_curve = np.array([acc[:, :, k][own_t.T].mean() if own_t.any() else np.nan for k in range(len(sc))])
            other_curve = np.array([acc[:, :, k][~own_t.T].mean() if (~own_t).any() else np.nan for k in range(len(sc))])
            ax.plot(sc, own_curve, marker="o", color="tab:red", label="own task's features")
            ax.plot(sc, other_curve, marker="o", color="tab:blue", label="other tasks' features")
            # unsteered accuracy over the same (task, feature) cells as each curve: tasks differ in accuracy
            base = np.broadcast_to(r.base_acc.numpy()[:, None], own_t.T.shape)  # [T, F]
            if own_t.any():
                ax.axhline(float(base[own_t.T].mean()), color="tab:red", ls=":", lw=1.2, label="unsteered, same cells as own")
            if (~own_t).any():
                ax.axhline(float(base[~own_t.T].mean()), color="tab:blue", ls=":", lw=1.2, label="unsteered, same cells as other")
            plain_log_axis(ax, "x")
            ax.set_xlabel("scale s of the subtracted feature direction")
            ax.set_ylabel("accuracy at every arrow")
            ax.legend(fontsize=8)
            fig.tight_layout()
            files = save(fig, out, f"steer-{art.key[:8]}-negative-scales")
            sec.figures.append(Figure("Negative steering by scale", "Mean accuracy at the arrows as one feature is "
                                      "subtracted with growing scale, the task's own features against the others'.", files))
        return sec
