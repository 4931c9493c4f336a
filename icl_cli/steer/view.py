"""Terminal views of a steer artifact (returned as rich renderables; the command layer prints them).

The heatmap has one row per task and one column per feature, two characters per cell, shaded by
the cell's relative loss decrease (or, with ``normalise``, by the row-normalised value: each row
divided by its max, cells under 0.2 set to 0, as in the paper's figure). Feature ids run down the
header. Columns are grouped by the task each feature helps most, so executors line up on a
diagonal; when there are more features than ``max_columns``, those with the largest effects are shown.
"""

from __future__ import annotations

from typing import Sequence

from icl_cli.steer.heatmaps import SteerResult, normalise_rows, specificity

SHADES = ("··", "░░", "▒▒", "▓▓", "██")
STYLES = ("grey50", "red3", "red1", "orange1", "yellow1")


def shade(v: float) -> int:
    """0 for v ≤ 0, else 1-4 by quarters of [0, 1]."""
    if v <= 0:
        return 0
    return min(4, 1 + int(v * 4))


def column_order(effect, max_columns: int) -> list[int]:
    """Feature indices to show: every task's best feature first, then those with the largest effect
    anywhere, up to ``max_columns``; grouped by the task they help most (tasks in row order), by
    decreasing effect inside a group."""
    top = effect.max(0)
    keep = list(dict.fromkeys(effect.argmax(1).tolist()))[:max_columns]
    for j in top.values.argsort(descending=True).tolist():
        if len(keep) >= max_columns:
            break
        if j not in keep:
            keep.append(j)
    return sorted(keep, key=lambda j: (int(top.indices[j]), -float(top.values[j])))


def heatmap_text(tasks: Sequence[str], features: Sequence[int], values, cols: Sequence[int], marked: dict | None = None):
    """rich Text: the header (ids written downwards) and one shaded line per task."""
    from rich.text import Text

    width = max(len(t) for t in tasks)
    ids = [str(features[j]) for j in cols]
    depth = max((len(s) for s in ids), default=1)
    text = Text()
    for k in range(depth):
        text.append(" " * (width + 2))
        for s in ids:
            s = s.rjust(depth)
            text.append(s[k] + " ", style="dim")
        text.append("\n")
    for i, t in enumerate(tasks):
        text.append(t.ljust(width) + "  ")
        own = set((marked or {}).get(t, []))
        for j in cols:
            level = shade(float(values[i, j]))
            style = STYLES[level] + (" bold underline" if features[j] in own else "")
            text.append(SHADES[level], style=style)
        text.append("\n")
    return text


def heatmap_tables(r: SteerResult, key: str, normalise: bool = False, max_columns: int = 60):
    """The heatmap and a per-task table (base nll, best feature, executors or detectors)."""
    from rich.table import Table

    what = "detectors" if r.mode == "detector" else "executors"
    values = normalise_rows(r.effect) if normalise else r.effect
    cols = column_order(r.effect, max(1, max_columns))
    shown = f"{len(cols)} of {len(r.features)} features" if len(cols) < len(r.features) else f"{len(r.features)} features"
    where = "the dummy output token" if r.mode == "detector" else "the arrow"
    title = (f"{r.mode} heatmap: relative loss decrease (base − nll)/base with {r.scale:g}·u_f added at {where} of "
             f"resid_pre[{r.layer}]{' (rows normalised, < 0.2 → 0)' if normalise else ''}; {shown}; steer {key[:12]}")
    legend = "  ".join(f"{s} {lab}" for s, lab in zip(SHADES, ("0", "<.25", "<.5", "<.75", "≥.75")))
    from rich.console import Group
    from rich.text import Text

    head = Text(title + "\n", style="bold")
    foot = Text(f"{legend}   (underlined: the row's {what})\n", style="dim")
    heat = Group(head, heatmap_text(r.tasks, r.features, values, cols, r.selected), foot)

    others = "every task of another group" if r.rule == "group" else "every other task"
    tab = Table(title=f"per task ({what}: effect ≥ {r.min_effect:g} on the task and ≤ {r.max_other:g}× that on {others})")
    for col in ("task", "base nll", "kept", "best feature", "effect", "own>others", what):
        tab.add_column(col, justify="left" if col in ("task", what, "best feature") else "right")
    spec = specificity(r.effect) if len(r.tasks) >= 2 else None
    for i, t in enumerate(r.tasks):
        b = int(r.effect[i].argmax())
        sel = ", ".join(str(f) for f in r.selected.get(t, [])[:8]) + (", …" if len(r.selected.get(t, [])) > 8 else "")
        tab.add_row(t, f"{float(r.base_nll[i]):.3f}", str(len(r.kept.get(t, []))), str(r.features[b]),
                    f"{float(r.effect[i, b]):.2f}", ("yes" if spec.specific[i] else "no") if spec else "–", sel or "–")
    out = [heat, tab]
    if spec:
        n = sum(spec.specific)
        out.append(Text(f"specificity: {n}/{len(r.tasks)} tasks ({spec.share:.2f}): the task's best feature lowers its "
                        f"loss (relatively) more than any other task's"))
    return out


def negative_table(r: SteerResult, key: str, max_columns: int = 60):
    """The feature × task matrix of accuracy drops at the shown scale (SPEC §6), then the mean
    accuracy over features by scale per task."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from icl_cli.steer.heatmaps import negative_drop, shown_scale

    s = shown_scale(r)
    drop = negative_drop(r, s)  # [F, T]
    if len(r.features):
        cols = column_order(drop.T.clamp(min=0), max(1, max_columns))
        head = Text(f"negative steering: accuracy drop at every arrow (base − steered) with {s:.3g}·u_f subtracted at "
                    f"the arrows of resid_pre[{r.layer}], one feature at a time; rows tasks, columns features "
                    f"({len(cols)} of {len(r.features)}); steer {key[:12]}\n", style="bold")
        legend = "  ".join(f"{c} {lab}" for c, lab in zip(SHADES, ("≤0", "<.25", "<.5", "<.75", "≥.75")))
        heat = Group(head, heatmap_text(r.tasks, r.features, drop.T, cols, r.selected),
                     Text(f"{legend}   (underlined: the features the row's task brought)\n", style="dim"))
    else:
        heat = Text("negative steering: no feature to subtract (every task's set is empty)\n", style="bold")
    tab = Table(title="per task: accuracy at every arrow, unsteered and by scale (mean over the features)")
    tab.add_column("task")
    tab.add_column("own features", justify="right")
    tab.add_column("s = 0", justify="right")
    for sc in r.scales.tolist():
        tab.add_column(f"s = {sc:.3g}", justify="right")
    for i, t in enumerate(r.tasks):
        by_scale = r.acc[i].mean(0) if len(r.features) else r.acc.new_full((len(r.scales),), float("nan"))
        tab.add_row(t, str(len(r.selected.get(t, []))), f"{float(r.base_acc[i]):.2f}",
                    *[f"{float(a):.2f}" for a in by_scale])
    return [heat, tab]
