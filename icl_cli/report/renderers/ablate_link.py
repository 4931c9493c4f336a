"""The report section of a frozen-attention link artifact (``ablate link``, the default estimand;
SPEC §8, the paper's Fig. 8). The ablation estimand keeps its section in ``ablate.py``.

Shows: own-task pairs against every other pair (tokens, mean, median, share of drops over 0.5,
and the histogram of drops); the detector-task × executor-task matrix of mean drops; the own
pairs one by one; and the detector × executor matrix of the most affected features, with the
task names on the axes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icl_cli.report.base import Figure, Section, Table, fmt

MAX_FEATURES = 40
"""At most this many detectors (rows) and executors (columns) in the feature figure."""


def link_match(own: dict, other: dict) -> str:
    """Own-task pairs' mean drop against the other pairs' (the paper: own pairs drop far more)."""
    from icl_cli.report.headline import judge

    if not own["pairs"] or own["mean"] != own["mean"]:
        return judge("cannot detect", "no own-task (detector, executor) pair: the executor never fired on its tasks' "
                                      "prompts, or no task selects both")
    o, x = own["mean"], other["mean"] if other["mean"] == other["mean"] else 0.0
    level = "yes" if o >= 0.1 and o >= 2 * max(x, 0.0) else "partly" if o > x + 0.02 else "no"
    return judge(level, f"own-task pairs drop {o:.3f} on average, other pairs {x:.3f}")


def frozen_section(art, r, attrs: dict, out: Path | None) -> Section:
    from icl_cli.ablate.link_frozen import feature_labels, summary_json

    data = summary_json(art.key, r)
    own, other = data["own_pairs"], data["other_pairs"]
    l, le = r.layers
    summary = {k: data[k] for k in ("estimand", "scale", "detector_layer", "executor_layer", "detectors", "executors",
                                    "own_pairs", "other_pairs", "task_matrix", "own_histogram", "other_histogram")}
    sec = Section(art.key, art.step, f"Detector → executor link, frozen attention (detectors at resid_pre[{l}], "
                  f"executors at resid_pre[{le}])", summary)
    f3 = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    sec.notes.append(f"Each detector removed at every token (−{r.scale:g} × its mean activation along its unit direction), "
                     f"block {l} run with the clean attention pattern: own-task executors drop by {f3(own['mean'])} on "
                     f"average (median {f3(own['median'])}, {f3(own['frac_half'])} of {own['positions']} tokens over 0.5; "
                     f"{own['pairs']} pairs), other pairs by {f3(other['mean'])} (median {f3(other['median'])}; "
                     f"{other['pairs']} pairs). 0 = the executor keeps its clean activation, 1 = it goes silent.")
    summary["headline"] = [{"finding": "Detector → executor effect (executor drop with the attention frozen, paper Fig. 8)",
                            "ours": f"own-task pairs mean drop {f3(own['mean'])}, other pairs {f3(other['mean'])}",
                            "paper": "own-task pairs drop far more than other pairs (Fig. 8)",
                            "match": link_match(own, other)}]
    sec.tables.append(Table("executor drop per token: own-task pairs and the others",
                            ["pairs", "n", "tokens", "mean drop", "median", "share > 0.5"],
                            [[name, str(g["pairs"]), str(g["positions"]), f3(g["mean"]), f3(g["median"]), f3(g["frac_half"])]
                             for name, g in (("own-task", own), ("other", other))]))
    dlab, elab = feature_labels(r.detectors, r.det_tasks, r.tasks), feature_labels(r.executors, r.exe_tasks, r.tasks)
    mean, med, frac, n = r.pair_mean.numpy(), r.pair_median.numpy(), r.pair_frac_half.numpy(), r.pair_count.numpy()
    pairs = sorted(zip(*np.nonzero(r.own.numpy() & (n > 0))), key=lambda ij: -mean[ij])
    sec.tables.append(Table("own-task pairs, largest mean drop first", ["detector", "executor", "mean drop", "median",
                                                                         "share > 0.5", "tokens"],
                            [[dlab[i], elab[j], fmt(float(mean[i, j]), 3), fmt(float(med[i, j]), 3), fmt(float(frac[i, j]), 3),
                              str(int(n[i, j]))] for i, j in pairs], align="llrrrr", terminal=False))
    rows, cols, tm = r.task_matrix()
    if rows and cols:
        from icl_cli.report.terminal import heatmap as term_heatmap

        sec.terminal.append(term_heatmap("mean drop: the row task's detectors → the column task's executors", tm.numpy(),
                                         rows, [str(k + 1) for k in range(len(cols))], digits=2,
                                         caption="columns: " + ", ".join(f"{k + 1} {c}" for k, c in enumerate(cols))))
    if out is not None:
        if rows and cols:
            sec.figures.append(_task_figure(art, rows, cols, tm.numpy(), out))
        sec.figures.append(_histogram_figure(art, r, out))
        if len(r.detectors) and len(r.executors):
            sec.figures.append(_feature_figure(art, r, mean, dlab, elab, out))
    return sec


def _task_figure(art, rows: list[str], cols: list[str], tm: np.ndarray, out: Path) -> Figure:
    from icl_cli.report.figures import (group_order, group_separators, heatmap, heatmap_size, outline, outline_legend, plt,
                                        save, task_label)

    p = plt()
    ro, co = group_order(rows), group_order(cols)  # the paper's task groups, lines between them
    rows, cols, tm = [rows[i] for i in ro], [cols[j] for j in co], np.asarray(tm)[np.ix_(ro, co)]
    rl, cl = [task_label(t) for t in rows], [task_label(t) for t in cols]
    fig, ax = p.subplots(figsize=heatmap_size(len(rl), len(cl), max(map(len, rl)), max(map(len, cl))))
    heatmap(ax, tm, rl, cl, cmap="viridis", cbar="mean executor drop (colours: its range)")
    group_separators(ax, rows, "y", color="tab:gray", lw=1.2)
    group_separators(ax, cols, "x", color="tab:gray", lw=1.2)
    n_out = 0
    for i, t in enumerate(rows):
        if t in cols:
            outline(ax, i, cols.index(t), "tab:red")
            n_out += 1
    outline_legend(ax, "tab:red", "detectors and executors of the same task", n_out, "no task has both")
    ax.set_xlabel("task of the executors")
    ax.set_ylabel("task of the detectors removed")
    ax.set_title("Detector → executor link (frozen attention): mean drop per task pair", pad=22)
    files = save(fig, out, f"ablate-{art.key[:8]}-link-tasks")
    return Figure("Detector → executor link by task", "Mean drop of the column task's executors, over every token where "
                  "they fire on the prompts of their tasks, when a detector of the row task is removed at every token and "
                  "block l runs with the clean attention pattern (SPEC §8, the paper's Fig. 8). Outlined: the same task.", files)


def _histogram_figure(art, r, out: Path) -> Figure:
    from icl_cli.report.figures import plt, save

    p = plt()
    hist = r.group_hist.numpy().astype(float)
    k = hist.shape[1]
    x = (np.arange(k) + 0.5) / k
    fig, ax = p.subplots(figsize=(7, 3.4))
    for g, (name, colour) in enumerate((("own-task pairs", "tab:red"), ("other pairs", "tab:grey"))):
        total = hist[g].sum()
        if total:
            ax.bar(x + (g - 0.5) * 0.4 / k, hist[g] / total, width=0.4 / k, color=colour,
                   label=f"{name} ({int(total)} tokens)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("executor drop 1 − min(1, max(0, a(new) / a(clean)))")
    ax.set_ylabel("share of tokens")
    ax.legend(frameon=False)
    ax.set_title("Detector → executor link (frozen attention): distribution of the drops")
    files = save(fig, out, f"ablate-{art.key[:8]}-link-drops")
    return Figure("Detector → executor drops", "Histogram of the per-token drop of executor activations when a detector "
                  "is removed (frozen attention pattern), pooled over own-task pairs and over every other pair.", files)


def _feature_figure(art, r, mean: np.ndarray, dlab: list[str], elab: list[str], out: Path) -> Figure:
    from icl_cli.report.figures import MAX_WIDTH_IN, heatmap, outline_pairs, plt, save, tick_size

    p = plt()
    score = np.nan_to_num(mean, nan=-1.0)
    ri = np.sort(np.argsort(-score.max(1), kind="stable")[:MAX_FEATURES])  # the most affected detectors and executors
    ci = np.sort(np.argsort(-score.max(0), kind="stable")[:MAX_FEATURES])
    m = mean[np.ix_(ri, ci)]
    own = r.own.numpy()[np.ix_(ri, ci)]
    rows, cols = [dlab[i] for i in ri], [elab[j] for j in ci]
    shown = "" if len(ri) == len(r.detectors) and len(ci) == len(r.executors) else \
        f" ({len(ri)} of {len(r.detectors)} detectors × {len(ci)} of {len(r.executors)} executors: the most affected)"
    room = 2.4 + 0.075 * max(map(len, rows)) + 1.4
    w = room + min(0.24 * len(cols), MAX_WIDTH_IN - room)  # drawn at the width the page shows it
    fig, ax = p.subplots(figsize=(max(w, 6), 2.3 + 0.075 * max(map(len, cols)) + 0.26 * len(rows)))
    heatmap(ax, m, rows, cols, cmap="viridis", cbar="mean executor drop (colours: its range)",
            annotate=len(cols) <= 10 and len(rows) <= 20, xrotation=90)
    ax.tick_params(axis="x", labelsize=tick_size(len(cols), w - room))
    outline_pairs(ax, own, "tab:red")
    ax.set_xlabel("executor feature (its tasks)")
    ax.set_ylabel("detector feature removed (its tasks)")
    ax.set_title("Detector → executor link (frozen attention): mean drop per pair" + shown, fontsize=10, pad=22)
    files = save(fig, out, f"ablate-{art.key[:8]}-link")
    return Figure("Detector → executor link matrix", "Mean drop of each executor over the tokens where it fires on its "
                  "tasks' prompts, when the detector is removed at every token and block l runs with the clean attention "
                  "pattern (SPEC §8). Outlined: pairs of the same task.", files)
