"""Terminal view of the frozen-attention link (``icl ablate link``): own-task pairs against the
others, the detector-task × executor-task matrix of mean drops, and the feature matrix when small.

    tables = frozen_tables(summary_json(key, r))   # rich renderables, printed by the command
"""

from __future__ import annotations

MAX_FEATURES = 24
"""The detector × executor feature matrix is shown when both sides have at most this many."""
SHOWN_BINS = 5
"""The stored histogram (``link_frozen.N_BINS`` bins over [0, 1]) is shown merged into this many."""


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def group_table(data: dict):
    """Own-task pairs against every other pair: tokens, mean, median, share over 0.5, histogram."""
    from rich.table import Table

    n_bins = data["histogram_bins"]
    merge = n_bins // SHOWN_BINS
    edges = [f"{k / SHOWN_BINS:.1f}–{(k + 1) / SHOWN_BINS:.1f}" for k in range(SHOWN_BINS)]
    tab = Table(title=f"detector → executor, frozen attention (paper Fig. 8): executor drop per token; ablate {data['key'][:12]}")
    tab.add_column("pairs")
    for col in ("n", "tokens", "mean drop", "median", "> 0.5", *edges):
        tab.add_column(col, justify="right")
    for name, g, hist in (("own-task", data["own_pairs"], data["own_histogram"]),
                          ("other", data["other_pairs"], data["other_histogram"])):
        total = sum(hist)
        shares = [sum(hist[k * merge:(k + 1) * merge]) / total if total else None for k in range(SHOWN_BINS)]
        tab.add_row(name, str(g["pairs"]), str(g["positions"]), _fmt(g["mean"]), _fmt(g["median"]),
                    _fmt(g["frac_half"]), *("" if s is None else f"{100 * s:.0f}%" for s in shares))
    tab.caption = (f"detectors at resid_pre[{data['detector_layer']}] shifted by −{data['scale']:g}·mean activation·unit "
                   f"direction at every token; block {data['detector_layer']} with the clean attention pattern; drop = "
                   "1 − min(1, max(0, a_e(new)/a_e(clean))) at every token where the executor fires, pooled over its "
                   "tasks' prompts. Own-task: some task selects both; the histogram columns are shares of tokens")
    silent = {t: ids for t, ids in data.get("silent_detectors", {}).items() if ids}
    if silent:
        tab.caption += "; silent detectors (skipped): " + "; ".join(f"{t} {len(ids)}" for t, ids in silent.items())
    return tab


def frozen_tables(data: dict) -> list:
    """The tables of one frozen-attention link summary (``link_frozen.summary_json``)."""
    from icl_cli.ablate.view import heatmap

    out = [group_table(data)]
    tm = data["task_matrix"]
    if tm["detector_tasks"] and tm["executor_tasks"]:
        hm = heatmap("mean drop: the row task's detectors → the column task's executors", tm["detector_tasks"],
                     tm["executor_tasks"], tm["mean_drop"], marks=[[r == c for c in tm["executor_tasks"]] for r in tm["detector_tasks"]],
                     fmt="{:.2f}", centre=0.0)
        hm.caption = "* = the same task (own-task pairs); 0 = the executors keep their activation, 1 = they go silent"
        out.append(hm)
    if len(data["detectors"]) <= MAX_FEATURES and len(data["executors"]) <= MAX_FEATURES:
        hm = heatmap("mean drop per pair (rows: detectors, columns: executors)", data["detector_labels"],
                     data["executor_labels"], data["mean_drop"], marks=data["own"], fmt="{:.2f}", centre=0.0)
        hm.caption = ("columns: " + ", ".join(f"{k + 1} {c}" for k, c in enumerate(data["executor_labels"]))
                      + "; * = a task's own pair")
        out.append(hm)
    return out
