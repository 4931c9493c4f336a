"""How `icl clean --estimate` and `icl train-sae --estimate` print the memory a run needs (the
numbers: icl_cli/clean/estimate.py, icl_cli/train_sae/estimate.py, icl_cli/core/memory.py)."""

from __future__ import annotations

from icl_cli.cli.context import Globals, emit


def emit_clean_estimate(gl: Globals, est) -> None:
    """A CleanEstimate: JSON, or its phases as a table."""
    data = est.data
    emit(gl, data, table=lambda: _table(f"clean estimate: {data['model']}, layer {est.layer}", data,
                                        f"one task at a time: SAE of {est.d_sae} features, prompts of ≤ {est.max_tokens} tokens; "))


def emit_train_sae_estimate(gl: Globals, est, arch: str) -> None:
    """A SaeEstimate: JSON, or its phases as a table."""
    data = est.data
    emit(gl, data, table=lambda: _table(f"train-sae estimate: {data['model']}", data,
                                        f"{len(data['layers'])} {arch} dictionaries of {est.width} features; "))


def _table(title: str, data: dict, what: str):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("phase")
    t.add_column("working memory GiB", justify="right")
    for k, v in data["phases_gib"].items():
        t.add_row(k + (" (peak)" if k == data["phase"] else ""), f"{v:.3f}")
    free = data["free_gib"]
    fits = "" if free is None else f"; free {free:.1f} GiB: {'fits' if data['total_gib'] <= free else 'does NOT fit'}"
    t.caption = (f"{what}weights {data['resident_gib']:.3f} GiB + peak {data['peak_gib']:.3f} GiB = {data['total_gib']:.3f} GiB"
                 f"{fits} (icl_cli/core/memory.py; within ±6% of measured peaks on scaled-down models)")
    return t
