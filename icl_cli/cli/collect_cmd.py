"""``icl collect``: task vectors, detector vectors and layer sweeps (SPEC §4), activation mass (§8).

    icl collect --tasks all --layers all --n-shot 19 --n-prompts 16
    icl collect --tasks antonyms,en_es --saes SAE_KEY -q
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from icl_cli.cli.common import load_lm, saved, task_progress
from icl_cli.cli.context import emit, g, log

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
    name: Optional[str] = typer.Option(None, "--name", help="Name the artifact."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the artifact exists."),
) -> None:
    """Collect task vectors and the layer sweep (run a subcommand for max-activating examples)."""
    if ctx.invoked_subcommand is not None:
        return
    from icl_cli.collect import FORMAT_VERSION, CollectParams, run_collect, summary_json, write_h5
    from icl_cli.core.identity import model_fingerprint, tasks_digest
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.dictionaries.io import load_dictionary
    from icl_cli.store import StepSpec

    gl = g(ctx)
    store = gl.store()
    p = CollectParams(tasks=tasks, layers=layers, n_shot=n_shot, n_prompts=n_prompts, n_eval=n_eval,
                      template=template, n_first=n_first, seed=gl.seed)
    task_list = resolve_tasks(tasks, tasks_dir)
    sae_arts = [store.resolve(ref) for ref in saes]
    lm = load_lm(gl, model)
    sae_objs = [(a.key, load_dictionary(a).to(lm.device)) for a in sae_arts]
    params = {**p.__dict__, "model": model, "tasks_dir": str(tasks_dir.resolve()) if tasks_dir else None, "model_fingerprint": model_fingerprint(lm.model),
              "tasks_digest": tasks_digest(task_list), "task_names": [t.name for t in task_list],
              "dtype": str(lm.dtype), "device": str(lm.device)}
    spec = StepSpec("collect", params, {f"sae{i}": a for i, a in enumerate(sae_arts)}, FORMAT_VERSION)
    holder = {}

    def build(st):
        with task_progress(gl, len(task_list), "collect") as advance:
            layer_list, results = run_collect(lm, task_list, p, sae_objs, progress=advance)
        with st.h5("collect.h5") as f:
            write_h5(f, layer_list, results)
        holder["data"] = (layer_list, results)
        best = {t: r.best_layer for t, r in results.items()}
        return {"best_layer": best}

    res = store.run(spec, build, name=name, force=force, log=lambda m: log(m, ctx_globals=gl))
    saved(gl, res)
    if "data" not in holder:
        from icl_cli.collect import read_h5

        holder["data"] = read_h5(res.artifact.file("collect.h5"))
    layer_list, results = holder["data"]
    data = summary_json(res.artifact.key, layer_list, results)
    emit(gl, data, table=lambda: _table(data), keys=[res.artifact.key])


def _table(data: dict):
    from rich.table import Table

    layers = [str(l) for l in data["layers"]]
    tab = Table(title=f"0-shot + TV loss (nll) by layer; * = best; collect {data['key'][:12]}")
    tab.add_column("task")
    tab.add_column("0-shot", justify="right")
    for l in layers:
        tab.add_column(f"L{l}", justify="right")
    tab.add_column("few-shot", justify="right")
    for task, r in data["tasks"].items():
        rows = r["layers"]
        first = rows[layers[0]]
        cells = [f"{rows[l]['tv_nll']:.2f}" + ("*" if int(l) == r["best_layer"] else "") for l in layers]
        tab.add_row(task, f"{first['zero_shot_nll']:.2f}", *cells, f"{first['few_shot_nll']:.2f}")
    return tab
