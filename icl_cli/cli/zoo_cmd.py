"""``icl zoo``: train and evaluate the bundled toy ICL model.

    icl zoo train toy-icl                 # rewrites icl_cli/zoo/toy-icl (deterministic, ~25 min on 2 CPU cores)
    icl zoo train toy-icl --out DIR --steps 300
    icl zoo eval toy-icl                  # re-measure the targets and print them
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import typer

from icl_cli.cli.common import run_env
from icl_cli.cli.context import emit, g

app = typer.Typer(help="The bundled toy ICL model: train it, measure it.", no_args_is_help=True)


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    name: str = typer.Argument("toy-icl", help="Zoo model to train (toy-icl)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: the bundled folder inside the package)."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps (default: the recipe's)."),
    evaluate_after: bool = typer.Option(True, "--eval/--no-eval", help="Measure the targets after training."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default 1, as the bundled weights; 2 is ~35% faster but not bit-identical)."),
) -> None:
    """Train the toy model from the built-in tasks (deterministic on CPU for a fixed --seed)."""
    from icl_cli.zoo.step import ToyTrainRequest, check_name, train_toy

    check_name(name)
    gl = g(ctx)
    req = ToyTrainRequest(out=out, steps=steps, evaluate_after=evaluate_after, resume=resume, threads=threads)
    out_dir, meta = train_toy(run_env(gl), req, progress=_bar)
    emit(gl, {"path": str(out_dir), **meta}, table=lambda: _table(meta), keys=[str(out_dir)])


@contextlib.contextmanager
def _bar(steps: int) -> Iterator:
    """The training's progress bar on stderr (-q changes stdout only); yields its (step, steps, loss) callback."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from icl_cli.cli.context import stderr_console

    with Progress(TextColumn("training toy-icl"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
                  TimeRemainingColumn(), console=stderr_console()) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))
        yield lambda s, n, loss: bar.update(task, completed=s, loss=loss)


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    name: str = typer.Argument("toy-icl", help="Zoo model to evaluate (toy-icl)."),
    path: Optional[Path] = typer.Option(None, help="Model folder (default: the bundled one)."),
    write: bool = typer.Option(False, help="Store the figures in the model's toy_icl.json."),
) -> None:
    """Measure accuracy by shots, 0-shot accuracy on shared-input tasks and task-vector gap closing."""
    from icl_cli.zoo.step import check_name, evaluate_toy
    from icl_cli.zoo.toy_icl import TOY_DIR

    check_name(name)
    gl = g(ctx)
    model_dir = path or TOY_DIR
    result = evaluate_toy(run_env(gl), model_dir, write=write)
    emit(gl, result, table=lambda: _table({"eval": result}), keys=[str(model_dir)])


def _table(meta: dict):
    from rich.table import Table

    ev = meta.get("eval")
    table = Table(title="toy-icl")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if "final_loss" in meta:
        table.add_row("final train loss", f"{meta['final_loss']:.4f}")
        table.add_row("train seconds", f"{meta['train_seconds']:.0f}")
    if ev:
        for k, v in ev["mean_acc"].items():
            table.add_row(f"mean acc {k}", f"{v:.3f}")
        table.add_row("0-shot acc, shared-input tasks", f"{ev['shared_input_acc_0shot']:.3f}")
        table.add_row("TV best layer", str(ev["tv_best_layer"]))
        table.add_row("TV gap closed (best layer)", f"{ev['tv_gap_closed_best_layer']:.2f}")
        table.add_row("TV gap closed (each task's best layer)", f"{ev['tv_gap_closed_own_best_layer']:.2f}")
    return table
