"""``icl steer``: steering with single SAE features (SPEC §6).

    icl steer --clean CLEAN_REF                                   # executor heatmap (scale 15)
    icl steer --clean CLEAN_REF --features 12,40 --tasks antonyms,en_es --normalise
    icl steer --clean CLEAN_DETECTORS_REF --mode detector         # dummy "X -> Y", scale 25
    icl steer --clean CLEAN_REF --mode negative [--executors STEER_REF]
    icl steer explore --sae SAE_REF --feature 12 --scale 15 --prompt "Follow the pattern:\\nhot ->"
"""

from __future__ import annotations

from typing import Optional

import typer

from icl_cli.cli.common import run_env
from icl_cli.cli.context import emit, g
from icl_cli.cli.shard_cli import SHARD_HELP, emit_step
from icl_cli.core.errors import IclError

app = typer.Typer(help="Steer with SAE features: executor / detector heatmaps, negative steering, exploration.",
                  invoke_without_command=True)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise IclError(f"cannot read --scales {text!r} as a comma-separated list of numbers") from None


@app.callback(invoke_without_command=True)
def steer_cmd(
    ctx: typer.Context,
    clean: Optional[str] = typer.Option(None, "--clean", help="The clean artifact (its layer, tasks and kept features)."),
    sae: Optional[str] = typer.Option(None, "--sae", help="SAE whose decoder directions steer (default: the clean artifact's)."),
    mode: str = typer.Option("executor", "--mode", help="executor | detector | negative."),
    features: str = typer.Option("all-kept", "--features", help="all-kept (union of the kept features) or ids F1,F2."),
    tasks: str = typer.Option("all", "--tasks", help="all (the clean artifact's tasks) or a comma-separated subset."),
    scale: Optional[float] = typer.Option(None, "--scale", help="Steering scale s (default 15 executor, 25 detector)."),
    scales: str = typer.Option("", "--scales", help="Negative mode: comma-separated scales (default: logspace 1…31.6, 7 values)."),
    n_prompts: int = typer.Option(32, "--n-prompts", help="Held-out prompts per task."),
    min_effect: float = typer.Option(0.2, "--min-effect", help="Executor rule: own-task relative loss decrease at least this."),
    max_other: float = typer.Option(0.5, "--max-other", help="Executor rule: the compared tasks' effect at most this × the own one."),
    rule: str = typer.Option("group", "--rule", help="Executor rule: group (compare with tasks of other task groups, the "
                             "paper's: related tasks may share a feature) | strict (compare with every other task)."),
    executors: Optional[str] = typer.Option(None, "--executors", help="Negative mode: subtract each task's executors from this steer artifact."),
    normalise: bool = typer.Option(False, "--normalise", help="Show each row divided by its max, cells under 0.2 as 0 (paper)."),
    max_columns: int = typer.Option(60, "--max-columns", help="Heatmap columns shown (the features with the largest effects)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Prompt rows per batched pass (features × prompts)."),
    shard: Optional[str] = typer.Option(None, "--shard", help=SHARD_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Name the artifact."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the artifact exists."),
) -> None:
    """Steer held-out prompts with each feature: the tasks × features heatmap, executors, negative sweeps."""
    if ctx.invoked_subcommand is not None:
        return
    from icl_cli.steer.step import SteerRequest, run_steer

    gl = g(ctx)
    if clean is None:
        raise IclError("--clean is required: the clean artifact whose features to steer (make one with `icl clean`)")
    req = SteerRequest(clean=clean, sae=sae, mode=mode, features=features, tasks=tasks, scale=scale,
                       scales=_floats(scales) if scales.strip() else None, n_prompts=n_prompts, min_effect=min_effect,
                       max_other=max_other, rule=rule, executors=executors, normalise=normalise, batch_size=batch_size, shard=shard,
                       name=name, force=force)
    emit_step(gl, run_steer(run_env(gl), req), lambda out: _views(out, mode, normalise, max_columns))


def _views(out, mode: str, normalise: bool, max_columns: int):
    from icl_cli.steer.view import heatmap_tables, negative_table

    if mode == "negative":
        return negative_table(out.res, out.result.artifact.key)
    return heatmap_tables(out.res, out.result.artifact.key, normalise, max_columns)


@app.command("explore")
def explore_cmd(
    ctx: typer.Context,
    sae: str = typer.Option(..., "--sae", help="SAE reference (artifact, folder or release id)."),
    feature: int = typer.Option(..., "--feature", help="Feature id."),
    scale: float = typer.Option(15.0, "--scale", help="Steering scale s."),
    prompt: str = typer.Option(..., "--prompt", help=r"Text to complete (a literal \n is a newline)."),
    max_new_tokens: int = typer.Option(10, "--max-new-tokens", help="Tokens generated greedily."),
    where: str = typer.Option("last", "--where", help="last (the prompt's last token, like the heatmap) | all."),
    model: Optional[str] = typer.Option(None, "--model", help="Model (default: the one the SAE was trained on)."),
    answer: Optional[str] = typer.Option(None, "--answer", help="Expected answer: its first token's probability without and with steering."),
) -> None:
    """Greedy completion of a prompt without and with one feature's direction added, side by side, and
    how the next token's probabilities change (the answer's and the top tokens')."""
    from icl_cli.steer.step import ExploreRequest, run_explore

    gl = g(ctx)
    text = prompt.replace("\\n", "\n")
    out = run_explore(run_env(gl), ExploreRequest(sae=sae, feature=feature, prompt=text, scale=scale,
                                                  max_new_tokens=max_new_tokens, where=where, model=model,
                                                  answer=answer))
    c = out.completion

    def table():
        from rich.table import Table
        from rich.text import Text

        tab = Table(title=f"feature {feature} × {scale:g} at resid_pre[{out.layer}] ({where} token)")
        tab.add_column("prompt")
        tab.add_column("without steering")
        tab.add_column("with steering")
        tab.add_row(text.replace("\n", "⏎"), c.plain.replace("\n", "⏎"), c.steered.replace("\n", "⏎"))
        probs = Table(title="next token: probability without and with steering (largest change first)", title_justify="left")
        for col in ("token", "without", "with", "change"):
            probs.add_column(col, justify="left" if col == "token" else "right")
        for row in out.data["next_token"]:
            d = row["p_steered"] - row["p_plain"]
            probs.add_row(repr(row["token"]) + (" (answer)" if row["answer"] else ""), f"{row['p_plain']:.3g}",
                          f"{row['p_steered']:.3g}", Text(f"{d:+.2g}", style="green" if d > 0 else "red" if d < 0 else ""))
        return [tab, probs]

    emit(gl, out.data, table=table)
