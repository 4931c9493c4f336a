"""``icl clean``: task vector cleaning with baselines (docs/METHODS.md §5).

    icl clean --tv COLLECT_REF --sae SAE_REF                  # λ auto, per task
    icl clean --tv COLLECT_REF --sae SAE_REF --l1 0.05        # the paper's fixed λ
    icl clean --tv COLLECT_REF --sae SAE_REF --tasks antonyms --sweep-l1 1e-3,1e-2,5e-2 --json
    icl clean --tv COLLECT_REF --sae SAE_AT_L_MINUS_1 --detectors
"""

from __future__ import annotations

from typing import Optional

import typer

from icl_cli.cli.common import run_env
from icl_cli.cli.context import g
from icl_cli.cli.shard_cli import SHARD_HELP, emit_step
from icl_cli.clean.artifact import AUTO_L1_GRID
from icl_cli.core.errors import IclError


def register(app: typer.Typer) -> None:
    app.command("clean")(clean_cmd)


def _floats(text: str, option: str = "--sweep-l1") -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise IclError(f"{option}: cannot read {text!r} as a comma-separated list of numbers") from None


def _l1(text: str) -> float | None:
    """--l1: ``auto`` (None) or a number ≥ 0."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise IclError(f"--l1 takes a number ≥ 0 or auto, not {text!r}") from None


def clean_cmd(
    ctx: typer.Context,
    tv: str = typer.Option(..., "--tv", help="The collect artifact holding the task vectors."),
    sae: str = typer.Option(..., "--sae", help="SAE for resid_pre at the cleaning layer (ref, folder or release id)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer (default: the SAE's)."),
    l1: str = typer.Option("auto", "--l1", help="L1 coefficient λ, or auto: per task, the largest λ of --l1-grid whose "
                           "validation nll stays within --l1-tolerance of the raw vector's (the paper used 0.05)."),
    l1_grid: str = typer.Option(",".join(f"{x:g}" for x in AUTO_L1_GRID), "--l1-grid", help="λs tried by --l1 auto (largest first)."),
    l1_start: float = typer.Option(0.01, "--l1-start", help="--l1 auto: the grid λ every task's search starts from "
                                   "(up while λs pass, down until one does)."),
    l1_tolerance: float = typer.Option(0.1, "--l1-tolerance", help="--l1 auto: allowed relative rise of the validation nll over the raw vector's."),
    l1_slack: float = typer.Option(0.01, "--l1-slack", help="--l1 auto: nats of validation nll always allowed on top of the tolerance."),
    n_val: int = typer.Option(24, "--n-val", help="--l1 auto: validation prompts (training pairs no training prompt asks)."),
    lr: float = typer.Option(0.01, "--lr", help="Adam learning rate."),
    max_steps: int = typer.Option(1000, "--max-steps", help="At most this many steps per task."),
    patience: int = typer.Option(200, "--patience", help="Early stopping: steps without a new minimum L0."),
    n_train: int = typer.Option(24, "--n-train", help="0-shot training prompts per task."),
    sweep_l1: str = typer.Option("", "--sweep-l1", help="Also clean with each λ of this comma-separated list."),
    tasks: str = typer.Option("all", "--tasks", help="all (the artifact's tasks) or a comma-separated subset."),
    detectors: bool = typer.Option(False, "--detectors", help="Clean the detector vectors (output tokens) instead; "
                                   "pass the SAE of layer l−1 (docs/METHODS.md §6)."),
    shard: Optional[str] = typer.Option(None, "--shard", help=SHARD_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Name the artifact."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the artifact exists."),
    estimate: bool = typer.Option(False, "--estimate", help="Only print the memory a task needs (nothing runs)."),
) -> None:
    """Clean task vectors into a few SAE features that keep the task (plus the baselines)."""
    from icl_cli.clean.step import CleanRequest, run_clean

    gl = g(ctx)
    req = CleanRequest(tv=tv, sae=sae, layer=layer, l1=_l1(l1), l1_grid=_floats(l1_grid, "--l1-grid"), l1_start=l1_start,
                       l1_tolerance=l1_tolerance, l1_slack=l1_slack, n_val=n_val, lr=lr, max_steps=max_steps,
                       patience=patience, n_train=n_train, sweep_l1=_floats(sweep_l1), tasks=tasks, detectors=detectors,
                       shard=shard, name=name, force=force)
    if estimate:
        from icl_cli.clean.estimate import estimate_clean
        from icl_cli.cli.estimates import emit_clean_estimate

        return emit_clean_estimate(gl, estimate_clean(run_env(gl), req))
    emit_step(gl, run_clean(run_env(gl), req), lambda out: _tables(out.data))


def _tables(data: dict) -> list:
    """Per task: kept features, L0 and held-out nll of each method; then the summary block."""
    from rich.table import Table

    from rich.text import Text

    from icl_cli.clean.artifact import SHORT, flag_note, l1_text

    what = "detector" if data.get("detectors") else "task"
    methods = list(data["methods"])
    tab = Table(title=f"{what} vector cleaning at resid_pre[{data['layer']}]: held-out nll per task; clean {data['key'][:12]}")
    short = {"zero_shot": "0-shot", "tv": "raw TV", "recon": "recon", "cleaned": "cleaned"}
    cols = ["task", "kept features (activation)", "L0 recon→cleaned", "λ"] + [short.get(m, f"GP k={m[4:]}") for m in methods] + ["flag"]
    for col in cols:
        tab.add_column(col, justify="left" if col in ("task", "kept features (activation)", "flag") else "right")
    for t, r in data["tasks"].items():
        feats = ", ".join(f"{f}({w:.1f})" for f, w in list(zip(r["features"], r["weights"]))[:6])
        if len(r["features"]) > 6:
            feats += ", …"
        lam = "-" if r.get("l1") is None else f"{r['l1']:g}" + ("" if r.get("auto", {}).get("passed", True) else "!")
        tab.add_row(t, feats, f"{r['l0']['recon']}→{r['l0']['cleaned']}", lam, *(f"{r['nll'][m]:.2f}" for m in methods),
                    ", ".join(SHORT[f] for f in r.get("flags", [])))
    if any(not r.get("auto", {}).get("passed", True) for r in data["tasks"].values()):
        tab.caption = "λ! : no λ of the grid kept the validation nll within tolerance; the one with the lowest was used"
    head = (f"\nSummary: held-out 0-shot prompts, vector added at the arrow of resid_pre[{data['layer']}].\n"
            f"SAE {data.get('sae_label') or data.get('sae')}\n{l1_text(data)}")
    return [tab, Text(head), *_summary(data, flag_note(data))]


def _summary(data: dict, flags: str) -> list:
    from rich.table import Table
    from rich.text import Text

    s_all, s_ok = data["summary"]["all"], data["summary"]["unflagged"]
    both = s_ok["n_tasks"] not in (0, s_all["n_tasks"])
    tab = Table(title=f"summary: means over {s_all['n_tasks']} tasks", title_justify="left")
    tab.add_column("method")
    for col in ("L0", "nll", "accuracy") + ((f"nll ({s_ok['n_tasks']} unflagged)", "accuracy (unflagged)") if both else ()):
        tab.add_column(col, justify="right")
    f = lambda v, p: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    for m, row in s_all["methods"].items():
        ok = s_ok["methods"].get(m, {})
        extra = (f(ok.get("nll"), 3), f(ok.get("acc"), 2)) if both else ()
        tab.add_row(row["name"], f(row["l0"], 1), f(row["nll"], 3), f(row["acc"], 2), *extra,
                    style="bold" if m == "cleaned" else None)
    notes = (f"cleaned L0 / reconstruction L0 (mean of per-task ratios): {f(s_all['l0_fraction'], 2)}\n"
             f"loss delta (nll TV − nll cleaned)/nll 0-shot: {f(s_all['loss_delta'], 3)}"
             + (f" ({f(s_ok['loss_delta'], 3)} unflagged)" if both else "") + f"\n{flags}")
    return [tab, Text(notes)]
