"""``icl collect``: task vectors, detector vectors and layer sweeps (SPEC §4), activation mass (§8).

    icl collect --tasks all --layers all --n-shot 19 --n-prompts 16
    icl collect --tasks antonyms,en_es --saes SAE_KEY -q
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from icl_cli.cli.common import run_env
from icl_cli.cli.context import emit, g
from icl_cli.cli.shard_cli import SHARD_HELP, emit_step
from icl_cli.core.errors import IclError

app = typer.Typer(help="Task vectors from few-shot prompts, layer sweeps, activations by token role.",
                  invoke_without_command=True)


@app.callback(invoke_without_command=True)
def collect_cmd(
    ctx: typer.Context,
    model: str = typer.Option("toy-icl", "--model", help="Preset, HF id or local folder."),
    tasks: str = typer.Option("all", "--tasks", help="all, or a comma-separated list of task names / JSON files."),
    tasks_dir: Optional[Path] = typer.Option(None, "--tasks-dir", help="Folder of task files to use as the suite."),
    layers: str = typer.Option("all", "--layers", help="all, 5, 2-7 or 1,3,5."),
    n_shot: int = typer.Option(19, "--n-shot", help="Examples per few-shot prompt."),
    n_prompts: int = typer.Option(16, "--n-prompts", help="Few-shot prompts averaged into each task vector."),
    n_eval: int = typer.Option(32, "--n-eval", help="Held-out prompts for the sweep metrics."),
    template: str = typer.Option("paper", "--template", help="paper | hendel | todd."),
    n_first: int = typer.Option(2, "--n-first", help="Answer tokens scored by nll."),
    saes: List[str] = typer.Option([], "--saes", help="SAE references for activation mass by role (repeatable)."),
    shard: Optional[str] = typer.Option(None, "--shard", help=SHARD_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Name the artifact."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the artifact exists."),
) -> None:
    """Collect task vectors and the layer sweep (run a subcommand for max-activating examples)."""
    if ctx.invoked_subcommand is not None:
        return
    from icl_cli.collect.step import CollectRequest, run_collect

    gl = g(ctx)
    req = CollectRequest(model=model, tasks=tasks, tasks_dir=tasks_dir, layers=layers, n_shot=n_shot, n_prompts=n_prompts,
                         n_eval=n_eval, template=template, n_first=n_first, saes=saes, shard=shard, name=name, force=force)
    emit_step(gl, run_collect(run_env(gl), req), lambda out: _table(out.data))


def _table(data: dict):
    from rich.table import Table

    from icl_cli.collect.artifact import SHORT, flag_note

    layers = [str(l) for l in data["layers"]]
    tab = Table(title=f"nll of 0-shot prompts with the task vector added, by layer (* = best, where the vector helps); "
                      f"collect {data['key'][:12]}")
    tab.add_column("task")
    tab.add_column("0-shot", justify="right")
    for l in layers:
        tab.add_column(f"layer {l}" if len(layers) <= 8 else l, justify="right")
    tab.add_column("few-shot", justify="right")
    tab.add_column("flag")
    for i, (task, r) in enumerate(data["tasks"].items()):
        rows = r["layers"]
        first = rows[layers[0]]
        # a layer is starred only where the vector lowers the 0-shot nll
        star = lambda l: int(l) == r["best_layer"] and rows[l]["tv_nll"] < first["zero_shot_nll"]  # noqa: E731
        cells = [f"{rows[l]['tv_nll']:.2f}" + ("*" if star(l) else "") for l in layers]
        tab.add_row(task, f"{first['zero_shot_nll']:.2f}", *cells, f"{first['few_shot_nll']:.2f}",
                    ", ".join(SHORT[f] for f in r["flags"]), end_section=i == len(data["tasks"]) - 1)
    for label, m in (("mean, all", data["mean"]["all"]), ("mean, unflagged", data["mean"]["unflagged"])):
        if not m["n_tasks"]:
            continue
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        tab.add_row(f"{label} ({m['n_tasks']})", f(m["zero_shot_nll"]), *(f(m["tv_nll"][l]) for l in layers),
                    f(m["few_shot_nll"]), "", style="bold")
    note = flag_note(data)
    best = data.get("best_layer")
    tab.caption = (f"most common best layer of the unflagged tasks: {best}" if best is not None else "no task is helped by its vector") + \
        (f"; {note}" if note else "; no flagged task")
    tables = [tab]
    keys = sorted({k for r in data["tasks"].values() for k in r.get("mass_pct", {})})
    for key in keys:
        mass = Table(title=f"activation mass by token role (% of all features), SAE {key[:12]}")
        roles = list(next(iter(data["tasks"].values()))["mass_pct"][key])
        mass.add_column("task")
        for role in roles:
            mass.add_column(role, justify="right")
        for task, r in data["tasks"].items():
            mass.add_row(task, *(f"{r['mass_pct'][key][role]:.1f}" for role in roles))
        tables.append(mass)
    return tables


@app.command("top-activations")
def top_activations_cmd(
    ctx: typer.Context,
    sae: str = typer.Option(..., "--sae", help="SAE reference (artifact, folder or release id)."),
    features: str = typer.Option(..., "--features", help="Comma-separated feature ids."),
    model: Optional[str] = typer.Option(None, "--model", help="Model (default: the one the SAE was trained on)."),
    dataset: str = typer.Option("tasks", "--dataset", help="tasks (toy corpus), local .txt/.jsonl files, or an HF dataset."),
    tokens: int = typer.Option(20000, "--tokens", help="Tokens to scan."),
    ctx_len: int = typer.Option(64, "--ctx", help="Chunk length in tokens."),
    n_top: int = typer.Option(10, "--n-top", help="Contexts kept per feature."),
    name: Optional[str] = typer.Option(None, "--name", help="Name the artifact."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the artifact exists."),
) -> None:
    """Store the top-activating contexts of chosen features, with the firing token marked."""
    from icl_cli.collect.step import TopRequest, run_top_activations

    gl = g(ctx)
    try:
        feats = tuple(int(f) for f in features.split(",") if f.strip())
    except ValueError:
        raise IclError(f"--features takes comma-separated integers, got {features!r}") from None
    out = run_top_activations(run_env(gl), TopRequest(sae=sae, features=feats, model=model, dataset=dataset, tokens=tokens,
                                                      ctx_len=ctx_len, n_top=n_top, name=name, force=force))
    emit(gl, out.data, table=lambda: _top_table(out.contexts), keys=[out.result.artifact.key])


def _top_table(ctxs: dict):
    from rich.table import Table
    from rich.text import Text

    tables = []
    for f, rows in ctxs.items():
        tab = Table(title=f"feature {f}: top contexts")
        tab.add_column("act", justify="right")
        tab.add_column("context (firing token highlighted)")
        for r in rows:
            text = Text()
            for i, tok in enumerate(r["tokens"]):
                shown = tok.replace("\n", "⏎").replace("▁", " ").replace("Ġ", " ")
                text.append(shown + (" " if not shown.startswith(" ") else ""), style="bold black on yellow" if i == r["fire"] else "")
            tab.add_row(f"{r['value']:.2f}", text)
        tables.append(tab)
    return tables
