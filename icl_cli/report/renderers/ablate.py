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


def _feature_tasks(art, which: str = "features0") -> dict[int, list[str]]:
    """feature id -> the tasks whose set holds it, from the steer artifact of input ``which`` (the
    detectors' and the executors' ids belong to different SAEs, so each is read apart): the rule's
    selection, or the kept features when the artifact measured those (``set`` kept)."""
    from icl_cli.ablate.feature_sets import read_steer

    out: dict[int, list[str]] = {}
    src = art.store.get(art.inputs.get(which, "")) if art.inputs.get(which) else None
    if src is not None and src.step == "steer":
        r = read_steer(src.file("steer.h5"))
        for t, ids in (r.kept if art.params.get("set") == "kept" else r.selected).items():
            for f in ids:
                out.setdefault(int(f), []).append(t)
    return out


def _tasks_text(tasks: list[str], label=str) -> str:
    """'antonyms' or 'antonyms +2' (a feature several tasks hold)."""
    return label(tasks[0]) + (f" +{len(tasks) - 1}" if len(tasks) > 1 else "")


def _what(art) -> tuple[str, str | None]:
    """(what the features are, executor | detector | None), from the artifact's feature source."""
    src = art.store.get(art.inputs.get("features0", "")) if art.inputs.get("features0") else None
    if src is not None and src.step == "steer":
        mode = src.params.get("mode")
        if art.params.get("set") == "kept":
            return f"kept features at the {mode} layer", mode
        return {"executor": "executors", "detector": "detectors"}.get(mode, "selected features"), mode
    return ("kept features" if src is not None and src.step == "clean" else "given features"), None


def mass_match(per: dict[str, float], role: str, paper: float, what: str) -> str:
    """Whether the best features' mass sits on the paper's role: within 15 points of its figure
    (yes), on that role more than on any other (partly), or not."""
    from icl_cli.report.headline import judge

    top = max(per, key=lambda k: per[k] if per[k] == per[k] else -1)
    level = "yes" if per[role] >= paper - 15 else "partly" if top == role else "no"
    reason = f"{per[role]:.0f}% on {role} tokens vs the paper's {paper}%" + ("" if top == role else f"; most on {top} ({per[top]:.0f}%)")
    if what.startswith("kept"):
        reason += f"; measured on {what}, not the rule's selection"
    return judge(level, reason)


def cross_match(cs: dict) -> str:
    """Own-task rise against other tasks' rise (cells that can detect only)."""
    from icl_cli.report.headline import judge

    own, other = cs["own_mean"], cs["other_mean"]
    if own is None:
        return judge("cannot detect", "no own-task cell can move: " + ("; ".join(
            x for x in (f"{len(cs['cannot_detect'])} tasks at the loss floor" if cs["cannot_detect"] else "",
                        f"{len(cs['empty_sets'])} empty sets" if cs["empty_sets"] else "") if x) or "nothing measured"))
    if other is None:
        return judge("partly", f"own tasks +{own:.3f} nats; no other-task cell to compare")
    level = "yes" if own > 0 and own >= 2 * max(other, 0) else "partly" if own > other else "no"
    few = cs["n_own"] < 3  # a mean of one or two cells says little either way
    if few and level == "yes":
        level = "partly"
    return judge(level, f"own {own:+.3f} vs other {other:+.3f} nats (own cells that can detect: {cs['n_own']}"
                 + (", too few to say more" if few else "") + ")")


def link_match(own_m: float, other_m: float, n_own: int) -> str:
    """Own-task pairs' drop (1 − after/before) against the others'."""
    from icl_cli.report.headline import judge

    if not n_own or own_m != own_m:
        return judge("cannot detect", "no own-task (detector, executor) pair fired on the clean prompts")
    if other_m != other_m:
        return judge("partly", f"own pairs keep {own_m:.3f} of their activation; no other-task pair to compare")
    d_own, d_other = 1 - own_m, 1 - other_m
    level = "yes" if d_own >= 0.1 and d_own >= 2 * max(d_other, 0) else "partly" if d_own > d_other + 0.02 else "no"
    return judge(level, f"own pairs keep {own_m:.3f} of their activation, others {other_m:.3f}")


@register("ablate")
class AblateRenderer(Renderer):
    version = 4

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
                                        "paper": f"{paper}% (layer {layer}, one best feature per task)",
                                        "match": mass_match(per, role, paper, what)}]
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
                                    "detectable": cs["own_mean"] is not None, "match": cross_match(cs)}]
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
        from icl_cli.report.figures import (group_order, group_separators, heatmap, heatmap_size, outline, outline_legend,
                                            plt, save, task_label)

        p = plt()
        ro, co = group_order(r.sets), group_order(r.tasks)  # the paper's task groups, lines between them
        rows = [task_label(r.sets[i]) + ("" if live is None or live[i] else " (empty)") for i in ro]
        cols = [task_label(r.tasks[j]) + ("" if ok_t is None or ok_t[j] else " (floor)") for j in co]
        delta, own = delta[np.ix_(ro, co)], own[np.ix_(ro, co)]
        fig, ax = p.subplots(figsize=heatmap_size(len(rows), len(cols), max(map(len, rows)), max(map(len, cols))))
        heatmap(ax, delta, rows, cols, cmap="RdBu_r", center=0.0, cbar="loss rise, ablated − clean (nats)",
                annotate=len(cols) <= 12)
        group_separators(ax, [r.sets[i] for i in ro], "y", color="tab:gray", lw=1.2)
        group_separators(ax, [r.tasks[j] for j in co], "x", color="tab:gray", lw=1.2)
        for i in range(len(rows)):
            for j in range(len(cols)):
                if own[i, j]:
                    outline(ax, i, j, "black")
        outline_legend(ax, "black", f"the task's own {what}", int(own.sum()), "no row task is measured")
        ax.set_xlabel("task measured ((floor): clean loss under 0.05 nats, cannot detect)")
        ax.set_ylabel(f"task whose {what}\nare ablated")
        ax.set_title(f"Cross-task ablation ({what} at {', '.join(art.params.get('roles', ['arrow']))} tokens), all-pairs loss",
                     pad=22)
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
                                         "tasks' (qualitative, link matrix)",
                                "match": link_match(own_m, other_m, n_own)}]
        dnames, enames = _feature_tasks(art, "features0"), _feature_tasks(art, "features1")
        pairs = [(i, j) for i in range(len(r.detectors)) for j in range(len(r.executors)) if bool(r.own[i, j])]
        pairs.sort(key=lambda ij: float(np.nan_to_num(ratio[ij], nan=np.inf)))  # the most affected pairs first
        rows = [[f"{r.detectors[i]}" + (f" ({_tasks_text(dnames[r.detectors[i]])})" if r.detectors[i] in dnames else ""),
                 f"{r.executors[j]}" + (f" ({_tasks_text(enames[r.executors[j]])})" if r.executors[j] in enames else ""),
                 fmt(float(ratio[i, j]), 3), "yes"] for i, j in pairs]
        sec.tables.append(Table("own-task pairs: executor activation at the arrows after / before the detector's removal "
                                "(most affected first)", ["detector", "executor", "after / before", "own"], rows, align="llrl"))
        if out is not None and len(r.detectors) and len(r.executors):
            sec.figures.append(self._link_figure(art, r, ratio, (dnames, enames), out))
        return sec

    @staticmethod
    def _link_figure(art, r, ratio, names: tuple[dict, dict], out: Path) -> Figure:
        from icl_cli.core.tasks import BUILTIN_NAMES
        from icl_cli.report.figures import MAX_WIDTH_IN, heatmap, outline_pairs, plt, save, task_label, tick_size

        p = plt()
        dnames, enames = names
        rank = {t: k for k, t in enumerate(BUILTIN_NAMES)}
        ratio = np.where(np.isfinite(ratio), ratio, np.nan)
        low = np.nan_to_num(ratio, nan=np.inf)
        ri = np.argsort(low.min(1), kind="stable")[:MAX_LINK]  # the detectors and executors most affected
        ci = np.argsort(low.min(0), kind="stable")[:MAX_LINK]
        # ordered by their task (the paper's task groups), so each task's features sit together
        first = lambda f, nm: (nm.get(f) or [None])[0]  # noqa: E731
        by_task = lambda ids, nm: lambda k: (rank.get(first(ids[k], nm), len(rank)), str(first(ids[k], nm)), ids[k])  # noqa: E731
        ri = np.array(sorted(ri, key=by_task(r.detectors, dnames)), dtype=int)
        ci = np.array(sorted(ci, key=by_task(r.executors, enames)), dtype=int)
        shown = "" if len(ri) == len(r.detectors) and len(ci) == len(r.executors) else \
            f" ({len(ri)} of {len(r.detectors)} detectors × {len(ci)} of {len(r.executors)} executors: the most affected)"
        own = r.own.numpy()[np.ix_(ri, ci)]
        change = ratio[np.ix_(ri, ci)] - 1.0  # 0: no effect; −1: the executor went silent
        dets, exes = [r.detectors[i] for i in ri], [r.executors[j] for j in ci]
        lab = lambda f, nm: f"{f} ({_tasks_text(nm[f], task_label)})" if f in nm else f"{f} (no task)"  # noqa: E731
        rows, cols = [lab(d, dnames) for d in dets], [lab(e, enames) for e in exes]
        room = 2.4 + 0.075 * max(map(len, rows)) + 1.4
        w = room + min(0.24 * len(cols), MAX_WIDTH_IN - room)
        fig, ax = p.subplots(figsize=(max(w, 6), 2.3 + 0.075 * max(map(len, cols)) + 0.26 * len(rows)))
        heatmap(ax, change, rows, cols, cmap="RdBu", center=0.0, cbar="executor activation change (after / before − 1)",
                annotate=len(cols) <= 10 and len(rows) <= 20, xrotation=90)
        ax.tick_params(axis="x", labelsize=tick_size(len(cols), w - room))
        ax.tick_params(axis="y", labelsize=tick_size(len(rows), 0.26 * len(rows)))
        for k in range(1, len(dets)):  # lines between the detectors (executors) of different tasks
            if first(dets[k], dnames) != first(dets[k - 1], dnames):
                ax.axhline(k - 0.5, color="tab:gray", lw=0.8)
        for k in range(1, len(exes)):
            if first(exes[k], enames) != first(exes[k - 1], enames):
                ax.axvline(k - 0.5, color="tab:gray", lw=0.8)
        outline_pairs(ax, own, "black")
        ax.set_xlabel("executor feature (its task)")
        ax.set_ylabel("detector feature removed (its task)")
        ax.set_title("Detector → executor link: change of the executor's activation at the arrows" + shown, fontsize=10, pad=22)
        files = save(fig, out, f"ablate-{art.key[:8]}-link")
        return Figure("Detector → executor link matrix", "Each executor's summed activation at the arrows of its tasks' "
                      "prompts after a detector's direction is removed at the output tokens, divided by the clean one, "
                      "minus 1 (SPEC §8): 0 (white) no effect, red a drop, blue a rise; features ordered by their "
                      "(first) task, grey lines between tasks, \"+k\": k more tasks hold the feature. Outlined: pairs "
                      "of the same task.", files)
