"""ablate: activation mass by token role (SPEC §8), the cross-task ablation matrix (§7) and the
detector → executor link (§8), one renderer for the three kinds of ablate artifact.

Figures: stacked bars of the mass per role (all tasks, then each task); the Δnll matrix (ablate
the features of the row's task, measure the column's task); the link matrix after/before of each
executor's activation at the arrows when a detector's direction is removed at the outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icl_cli.report.base import Figure, Renderer, Section, Table, fmt, register

ROLE_COLOURS = {"none": "#bbbbbb", "prompt": "#8c564b", "input": "#1f77b4", "arrow": "#d62728", "output": "#2ca02c",
                "newline": "#9467bd"}
MAX_LINK = 40
"""At most this many detectors (rows) and executors (columns) in the link figure."""
PAPER_MASS = {"executor": ("arrow", 89.8, 12), "detector": ("output", 96.8, 11)}


def _feature_tasks(art) -> dict[int, str]:
    """feature id -> the first task that selects it, from the steer artifacts this one was made from."""
    from icl_cli.ablate.feature_sets import read_steer

    out: dict[int, str] = {}
    for key in art.inputs.values():
        src = art.store.get(key)
        if src is not None and src.step == "steer":
            for t, ids in read_steer(src.file("steer.h5")).selected.items():
                for f in ids:
                    out.setdefault(int(f), t)
    return out


def _what(art) -> tuple[str, str | None]:
    """(what the features are, executor | detector | None), from the artifact's feature source."""
    src = art.store.get(art.inputs.get("features0", "")) if art.inputs.get("features0") else None
    if src is not None and src.step == "steer":
        mode = src.params.get("mode")
        if art.params.get("set") == "kept":
            return f"kept features at the {mode} layer", mode
        return {"executor": "executors", "detector": "detectors"}.get(mode, "selected features"), mode
    return ("kept features" if src is not None and src.step == "clean" else "given features"), None


@register("ablate")
class AblateRenderer(Renderer):
    def build(self, art, out: Path | None) -> Section:
        kind = art.params.get("kind")
        if kind == "mass":
            return self._mass(art, out)
        if kind == "link":
            return self._link(art, out)
        return self._features(art, out)

    # ---- activation mass -----------------------------------------------------------------
    def _mass(self, art, out: Path | None) -> Section:
        from icl_cli.ablate.mass import ROW_NAMES, read_h5

        r = read_h5(art.file("mass.h5"))
        what, mode = _what(art)
        per = r.per_feature()
        pooled = r.percent()
        sec = Section(art.key, art.step, f"Activation mass by token role: {what}",
                      {"set": what, "per_feature_percent": per, "pooled_percent": pooled, "empty": r.empty,
                       "tasks": {t: r.best_share(t) for t in r.tasks}})
        top = max(per, key=lambda k: per[k] if per[k] == per[k] else -1)
        sec.notes.append(f"One best feature per task ({len(r.tasks)} tasks; inputs and outputs as whole words), mean share: "
                         + ", ".join(f"{k} {v:.1f}%" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.5)
                         + f" (most on {top} tokens). Pooled over every feature of every set (a different quantity): "
                         + ", ".join(f"{k} {v:.1f}%" for k, v in sorted(pooled.items(), key=lambda kv: -kv[1]) if v >= 0.5) + ".")
        if r.empty:
            sec.notes.append(f"Not measured (empty feature set): {', '.join(r.empty)}.")
        if mode in PAPER_MASS:
            role, paper, layer = PAPER_MASS[mode]
            sec.summary["headline"] = [{"finding": f"Activation mass of {what} on {role} tokens",
                                        "ours": f"{per[role]:.1f}% (one best feature of each of {len(r.tasks)} tasks; "
                                                f"pooled {pooled[role]:.1f}%)"
                                                + (f"; {len(r.empty)} tasks with no {what}" if r.empty else ""),
                                        "paper": f"{paper}% (layer {layer}, one best feature per task)"}]
        rows = [["mean of best features", *(f"{per[k]:.1f}" for k in ROW_NAMES), "–"],
                ["pooled, all features", *(f"{pooled[k]:.1f}" for k in ROW_NAMES), str(sum(len(v) for v in r.features.values()))]]
        rows += [[f"{t} (feature {r.features[t][0]})", *(f"{r.best_share(t)[k]:.1f}" for k in ROW_NAMES), str(len(r.features[t]))]
                 for t in r.tasks]
        sec.tables.append(Table(f"share of the activation of the {what} per token role (%): each task's best feature",
                                ["task", *ROW_NAMES, "features"], rows))
        if out is not None:
            sec.figures.append(self._mass_figure(art, r, what, out))
        return sec

    @staticmethod
    def _mass_figure(art, r, what: str, out: Path) -> Figure:
        from icl_cli.ablate.mass import ROW_NAMES

        from icl_cli.report.figures import plt, save, task_label

        p = plt()
        labels = ["mean of best features"] + [f"{task_label(t)} ({r.features[t][0]})" for t in r.tasks]
        per = r.per_feature()
        shares = np.array([[per[k] for k in ROW_NAMES]] + [[r.best_share(t)[k] for k in ROW_NAMES] for t in r.tasks])
        fig, ax = p.subplots(figsize=(8.5, 1.4 + 0.32 * len(labels)))
        left = np.zeros(len(labels))
        y = np.arange(len(labels))
        for j, role in enumerate(ROW_NAMES):
            ax.barh(y, shares[:, j], left=left, color=ROLE_COLOURS[role], label=role, height=0.7)
            for i in np.nonzero(shares[:, j] >= 8)[0]:  # the share written on segments wide enough for it
                ax.text(left[i] + shares[i, j] / 2, y[i], f"{shares[i, j]:.0f}%", ha="center", va="center", fontsize=8,
                        color="white" if role not in ("none",) else "black")
            left += shares[:, j]
        ax.set_yticks(y, labels=labels)
        ax.get_yticklabels()[0].set_fontweight("bold")
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of the features' summed activation (%)")
        ax.grid(axis="y", visible=False)
        ax.set_title(f"Activation mass by token role: each task's best of its {what}, on its few-shot prompts")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="token role")
        files = save(fig, out, f"ablate-{art.key[:8]}-mass")
        return Figure(f"Activation mass by role ({what})", "Share of the summed activation of each task's best feature over "
                      "the tokens of each role of its few-shot prompts (inputs and outputs as whole words), and their "
                      "mean over tasks (the paper's figure, SPEC §8).", files)

    # ---- feature-set ablation (the cross-task matrix) -------------------------------------
    def _features(self, art, out: Path | None) -> Section:
        from icl_cli.ablate.feature_ablation import FLOOR_NLL, cross_summary, detectable, empty_sets, loss_rise, read_h5

        r = read_h5(art.file("ablate.h5"))
        what, _ = _what(art)
        metric = "apl"
        unit = "loss over every pair but the first (−all-pairs log-prob)"
        rise = loss_rise(r, metric).numpy()
        ok_t = detectable(r, metric).numpy()
        empty = empty_sets(r)
        live = np.array([s not in empty for s in r.sets])
        shown = np.where(ok_t[None, :] & live[:, None], rise, np.nan)
        own = np.array([[s == t for t in r.tasks] for s in r.sets])
        roles = art.params.get("roles", ["arrow"])
        cs = cross_summary(r, metric)
        summary = {"set": what, "sets": r.sets, "tasks": r.tasks, "metric": metric,
                   "loss_rise": np.where(np.isfinite(shown), shown, None).tolist(), "roles": roles,
                   "delta_nll": (r.ablated["nll"] - r.base["nll"][None, :]).tolist(),
                   "cannot_detect": cs["cannot_detect"], "empty_sets": cs["empty_sets"]}
        sec = Section(art.key, art.step, f"Ablating {what} at {', '.join(roles)} tokens"
                      + (" (cross-task)" if art.params.get("cross_task") else ""), summary)
        apart = []
        if cs["cannot_detect"]:
            apart.append(f"cannot detect on {', '.join(cs['cannot_detect'])} (clean loss under {FLOOR_NLL} nats: at the floor)")
        if cs["empty_sets"]:
            apart.append(f"no {what} for {', '.join(cs['empty_sets'])} (empty set: not measured)")
        if cs["own_mean"] is not None:
            summary["own_mean_rise"] = cs["own_mean"]
            text = f"Ablating a task's {what} raises its own {unit} by {cs['own_mean']:+.3f} nats on average ({cs['n_own']} tasks)"
            if cs["other_mean"] is not None:
                summary["other_mean_rise"] = cs["other_mean"]
                text += f", other tasks' by {cs['other_mean']:+.3f} ({cs['n_other']} cells)"
            sec.notes.append(text + "." + (" Left out: " + "; ".join(apart) + "." if apart else ""))
        elif apart:
            sec.notes.append("Nothing measurable: " + "; ".join(apart) + ".")
        if art.params.get("cross_task"):
            ours = (f"own task {cs['own_mean']:+.3f}, other tasks {cs['other_mean']:+.3f} nats of all-pairs loss"
                    if cs["own_mean"] is not None and cs["other_mean"] is not None else "cannot detect: no measurable cell")
            summary["headline"] = [{"finding": f"Cross-task ablation of {what} (few-shot prompts)",
                                    "ours": ours + (f" ({'; '.join(apart)})" if apart else ""),
                                    "paper": "ablating a task's executors hurts that task most (qualitative, cross-task matrix)",
                                    "detectable": cs["own_mean"] is not None}]
        rows = []
        for i, s in enumerate(r.sets):
            for j, t in enumerate(r.tasks):
                if not (own[i, j] or not own.any()) or not np.isfinite(rise[i, j]):
                    continue
                cell = "cannot detect" if not ok_t[j] else ("empty set" if not live[i] else f"{rise[i, j]:+.3f}")
                rows.append([s, t, fmt(float(-r.base["apl"][j]), 3), fmt(float(-r.ablated["apl"][i, j]), 3), cell])
        sec.tables.append(Table(f"{unit} of few-shot prompts with the {what} ablated", ["features of", "measured on", "clean",
                                                                                    "ablated", "rise"], rows, align="llrrr"))
        if art.params.get("cross_task") and len(r.sets) > 1:
            from icl_cli.report.terminal import heatmap as term_heatmap

            sec.terminal.append(term_heatmap("loss rise (all pairs): ablate the row's features, measure the column's task "
                                             "(blank: cannot detect or empty set)", shown, r.sets,
                                             [str(k + 1) for k in range(len(r.tasks))], digits=3,
                                             caption="columns: " + ", ".join(f"{k + 1} {t}" for k, t in enumerate(r.tasks))))
            if out is not None:
                sec.figures.append(self._cross_figure(art, r, shown, own, what, out, ok_t, live))
        return sec

    @staticmethod
    def _cross_figure(art, r, delta, own, what: str, out: Path, ok_t=None, live=None) -> Figure:
        from icl_cli.report.figures import heatmap, heatmap_size, outline, plt, save, task_label

        p = plt()
        rows = [task_label(s) + ("" if live is None or live[i] else " (empty)") for i, s in enumerate(r.sets)]
        cols = [task_label(t) + ("" if ok_t is None or ok_t[j] else " (floor)") for j, t in enumerate(r.tasks)]
        fig, ax = p.subplots(figsize=heatmap_size(len(rows), len(cols), max(map(len, rows)), max(map(len, cols))))
        finite = delta[np.isfinite(delta)]
        small = finite.size and np.abs(finite).max() < 0.05
        heatmap(ax, delta, rows, cols, cmap="RdBu_r", center=0.0, cbar="loss rise, ablated − clean (nats)",
                fmt="{:+.1e}" if small else "{:+.2f}", annotate=len(cols) <= 12)
        for i in range(len(rows)):
            for j in range(len(cols)):
                if own[i, j]:
                    outline(ax, i, j, "black")
        ax.set_xlabel("task measured ((floor): clean loss under 0.05 nats, cannot detect)")
        ax.set_ylabel(f"task whose {what}\nare ablated")
        ax.set_title(f"Cross-task ablation ({what} at {', '.join(art.params.get('roles', ['arrow']))} tokens), all-pairs loss")
        files = save(fig, out, f"ablate-{art.key[:8]}-cross-task")
        return Figure("Cross-task ablation matrix", f"Rise of the all-pairs loss (every pair but the first) of the column's "
                      f"task when the {what} of the row's task are ablated (SPEC §7); outlined: the task's own features; "
                      "blank: cannot detect (clean loss at the floor) or an empty set.", files)

    # ---- detector → executor link ----------------------------------------------------------
    def _link(self, art, out: Path | None) -> Section:
        from icl_cli.ablate.link import read_h5

        r, attrs = read_h5(art.file("link.h5"))
        if attrs.get("estimand") == "frozen-attention":  # the default estimand: its own section
            from icl_cli.report.renderers.ablate_link import frozen_section

            return frozen_section(art, r, attrs, out)
        ratio = r.ratio.numpy()
        own_m, other_m, n_own, n_other = r.own_vs_other()
        summary = {"detectors": r.detectors, "executors": r.executors, "ratio": np.where(np.isfinite(ratio), ratio, None).tolist(),
                   "own_mean_ratio": own_m, "other_mean_ratio": other_m, "n_own": n_own, "n_other": n_other,
                   "removal": attrs.get("removal")}
        sec = Section(art.key, art.step, f"Detector → executor link (detectors at resid_pre[{attrs.get('detector_layer')}], "
                      f"executors at resid_pre[{attrs.get('executor_layer')}])", summary)
        sec.notes.append(f"Removing a detector's direction ({attrs.get('removal')}) at the output tokens leaves its own task's "
                         f"executors at {own_m:.2f} of their arrow activation ({n_own} pairs), other pairs at {other_m:.2f} "
                         f"({n_other} pairs).")
        summary["headline"] = [{"finding": "Detector → executor effect (executor activation after / before removing a detector)",
                                "ours": f"own-task pairs {own_m:.2f}, other pairs {other_m:.2f}",
                                "paper": "removing a task's detectors lowers its executors' activation much more than other "
                                         "tasks' (qualitative, link matrix)"}]
        names = _feature_tasks(art)
        rows = [[f"{d}" + (f" ({names[d]})" if d in names else ""), f"{e}" + (f" ({names[e]})" if e in names else ""),
                 fmt(float(ratio[i, j]), 3), "yes" if bool(r.own[i, j]) else ""]
                for i, d in enumerate(r.detectors) for j, e in enumerate(r.executors) if bool(r.own[i, j])]
        sec.tables.append(Table("own-task pairs: executor activation at the arrows after / before the detector's removal",
                                ["detector", "executor", "after / before", "own"], rows, align="llrl"))
        if out is not None and len(r.detectors) and len(r.executors):
            sec.figures.append(self._link_figure(art, r, ratio, names, out))
        return sec

    @staticmethod
    def _link_figure(art, r, ratio, names: dict, out: Path) -> Figure:
        from icl_cli.report.figures import heatmap, outline, plt, save, task_label

        p = plt()
        lab = lambda f: f"{f} ({task_label(names[f])})" if f in names else str(f)  # noqa: E731
        ratio = np.where(np.isfinite(ratio), ratio, np.nan)
        low = np.nan_to_num(ratio, nan=np.inf)
        ri = np.argsort(low.min(1), kind="stable")[:MAX_LINK]  # the detectors and executors most affected
        ci = np.argsort(low.min(0), kind="stable")[:MAX_LINK]
        ri, ci = np.sort(ri), np.sort(ci)
        shown = "" if len(ri) == len(r.detectors) and len(ci) == len(r.executors) else \
            f" ({len(ri)} of {len(r.detectors)} detectors × {len(ci)} of {len(r.executors)} executors: the most affected)"
        own = r.own.numpy()[np.ix_(ri, ci)]
        ratio = ratio[np.ix_(ri, ci)]
        dets, exes = [r.detectors[i] for i in ri], [r.executors[j] for j in ci]
        rows, cols = [lab(d) for d in dets], [lab(e) for e in exes]
        many = len(cols) > 30
        w = 2.4 + 0.075 * max(map(len, rows)) + 0.24 * len(cols) + 1.0
        fig, ax = p.subplots(figsize=(max(w, 6), 1.8 + 0.075 * max(map(len, cols)) + 0.26 * len(rows)))
        heatmap(ax, ratio, rows, cols if not many else [str(e) for e in exes], cmap="viridis", vmin=0,
                vmax=max(1.0, float(np.nanmax(ratio)) if np.isfinite(ratio).any() else 1.0),
                cbar="executor activation after / before", annotate=len(cols) <= 10 and len(rows) <= 20, xrotation=90)
        if own.mean() < 0.5:  # outlining most cells would show nothing
            for i, j in zip(*np.nonzero(own)):
                outline(ax, i, j, "tab:red")
        ax.set_xlabel("executor feature (its task)")
        ax.set_ylabel("detector feature removed (its task)")
        ax.set_title("Detector → executor link: activation kept at the arrows" + shown, fontsize=10)
        files = save(fig, out, f"ablate-{art.key[:8]}-link")
        return Figure("Detector → executor link matrix", "Each executor's summed activation at the arrows of its tasks' "
                      "prompts after a detector's direction is removed at the output tokens, divided by the clean one "
                      "(SPEC §8; 1 = no effect). Outlined: pairs of the same task.", files)
