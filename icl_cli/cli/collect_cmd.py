"""``icl collect``: task vectors, detector vectors and layer sweeps (SPEC §4), activation mass (§8).

    icl collect --tasks all --layers all --n-shot 19 --n-prompts 16
    icl collect --tasks antonyms,en_es --saes SAE_KEY -q
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from icl_cli.cli.common import load_lm, maybe_artifact, saved, task_progress
from icl_cli.cli.context import emit, g, log
from icl_cli.cli.shard_cli import SHARD_HELP, finish

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
    from icl_cli.cli.fastpath import cpu_device_dtype
    from icl_cli.collect.artifact import FORMAT_VERSION, CollectParams, read_sweeps, summary_json
    from icl_cli.core.identity import model_info, tasks_digest
    from icl_cli.core.layers import parse_layers
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.store import StepSpec

    gl = g(ctx)
    store = gl.store()
    p = CollectParams(tasks=tasks, layers=layers, n_shot=n_shot, n_prompts=n_prompts, n_eval=n_eval,
                      template=template, n_first=n_first, seed=gl.seed)
    task_list = resolve_tasks(tasks, tasks_dir)
    sae_arts = [store.resolve(ref) for ref in saes]
    # the key comes from the model's config and files, and the device from the machine: an
    # existing artifact is reused without loading the model or importing torch
    fingerprint, n_layers, _ = model_info(model, gl.trust_remote_code)
    lm = None if fingerprint else load_lm(gl, model)
    device, dtype = cpu_device_dtype(gl) or _device_dtype(gl)
    if not fingerprint:
        from icl_cli.core.identity import model_fingerprint

        fingerprint = model_fingerprint(lm.model)
    params = {**p.__dict__, "layers": parse_layers(layers, n_layers), "model": model,
              "tasks_dir": str(tasks_dir.resolve()) if tasks_dir else None,
              "model_fingerprint": fingerprint,
              "tasks_digest": tasks_digest(task_list), "task_names": [t.name for t in task_list],
              "dtype": dtype, "device": device}
    spec = StepSpec("collect", params, {f"sae{i}": a for i, a in enumerate(sae_arts)}, FORMAT_VERSION)
    from icl_cli.store import shards as sharding

    part, torchrun = sharding.resolve(shard)
    names = [t.name for t in task_list]
    by_name = {t.name: t for t in task_list}
    holder = {}

    def compute(st, subset):
        from icl_cli.collect.vectors import run_collect, write_h5
        from icl_cli.dictionaries.io import load_dictionary

        lm_ = lm or load_lm(gl, model)
        sae_objs = [(a.key, load_dictionary(a).to(lm_.device)) for a in sae_arts]
        with task_progress(gl, len(subset), "collect") as advance:
            layer_list, results = run_collect(lm_, [by_name[t] for t in subset], p, sae_objs, progress=advance,
                                              work_dir=st.work_dir)
        with st.h5("collect.h5") as f:
            write_h5(f, layer_list, results)
        holder["data"] = (layer_list, results)
        return {"best_layer": {t: r.best_layer for t, r in results.items()}}

    def merge(st, parts):
        from icl_cli.collect.vectors import read_h5, write_h5

        merged, layer_list = {}, None
        for _, art in parts:
            layer_list, results = read_h5(art.file("collect.h5"))
            merged.update(results)
        results = {t: merged[t] for t in names}
        with st.h5("collect.h5") as f:
            write_h5(f, layer_list, results)
        holder["data"] = (layer_list, results)
        return {"best_layer": {t: r.best_layer for t, r in results.items()}}

    out = sharding.run(store, spec, names, compute, merge, shard=part, torchrun=torchrun, name=name, force=force,
                       say=lambda m: log(m, ctx_globals=gl))
    if not finish(gl, out, names):
        return
    res = out.result
    saved(gl, res)
    if "data" not in holder or res.reused:
        holder["data"] = read_sweeps(res.artifact.file("collect.h5"))
    layer_list, results = holder["data"]
    data = summary_json(res.artifact.key, layer_list, results)
    emit(gl, data, table=lambda: _table(data), keys=[res.artifact.key])


def _device_dtype(gl) -> tuple[str, str]:
    """str(device), str(dtype) of a run, asking torch (a GPU may be there)."""
    from icl_cli.core.models import resolve_device, resolve_dtype

    device = resolve_device(gl.device)
    return str(device), str(resolve_dtype(gl.dtype, device))


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
    from icl_cli.core.identity import model_fingerprint
    from icl_cli.dictionaries.io import load_dictionary
    from icl_cli.core.errors import IclError
    from icl_cli.store import StepSpec
    from icl_cli.collect.top_activations import FORMAT_VERSION, TopParams, contexts, read_h5, top_activations, write_h5

    gl = g(ctx)
    store = gl.store()
    try:
        feats = tuple(int(f) for f in features.split(",") if f.strip())
    except ValueError:
        raise IclError(f"--features takes comma-separated integers, got {features!r}") from None
    if not feats or tokens < 1 or n_top < 1 or ctx_len < 2:
        raise IclError("need at least one feature, --tokens ≥ 1, --n-top ≥ 1 and --ctx ≥ 2")
    art = maybe_artifact(store, sae)
    d = load_dictionary(art if art is not None else sae, store)
    model = model or d.cfg.model or "toy-icl"
    p = TopParams(feats, dataset, tokens, ctx_len, n_top, gl.seed)
    lm = load_lm(gl, model)
    d = d.to(lm.device)
    params = {**p.__dict__, "model": model, "model_fingerprint": model_fingerprint(lm.model),
              "sae": None if art is not None else sae}
    spec = StepSpec("top-activations", params, {"sae": art}, FORMAT_VERSION)

    def build(st):
        r = top_activations(lm, d, p)
        with st.h5("top_activations.h5") as f:
            write_h5(f, p, r)
        return None

    res = store.run(spec, build, name=name, force=force, log=lambda m: log(m, ctx_globals=gl))
    saved(gl, res)
    fs, r = read_h5(res.artifact.file("top_activations.h5"))
    ctxs = contexts(lm.tokenizer, fs, r)
    data = {"key": res.artifact.key, "features": {str(f): rows for f, rows in ctxs.items()}}
    emit(gl, data, table=lambda: _top_table(ctxs), keys=[res.artifact.key])


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
