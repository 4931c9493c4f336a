"""``icl ablate``: causal tests of feature sets (issue 9; SPEC §7-8).

    icl ablate --features STEER_OR_CLEAN_REF --roles arrow --mode zero [--cross-task]
    icl ablate --features 5:12,5:40 --sae SAE_REF --roles arrow,output --tasks antonyms,en_es
    icl ablate mass --features STEER_REF                  # activation mass by token role
    icl ablate link --detectors DET_STEER --executors EXE_STEER
    icl ablate --circuit CIRCUIT_REF --max-nodes 500      # faithfulness of a circuit (icl circuit)
"""

from __future__ import annotations

from typing import List, Optional

import typer

from icl_cli.cli.common import run_env
from icl_cli.cli.context import emit, g
from icl_cli.core.errors import IclError

app = typer.Typer(help="Ablate feature sets; activation mass by role; the detector → executor link.",
                  invoke_without_command=True)

_FEATURES_HELP = "A steer artifact (its executors/detectors), a clean artifact (kept features), or LAYER:ID,... with --sae."


# options shared by the subcommands (one declaration each; typer reads these defaults, never mutates them)
_WHICH = typer.Option("selected", "--set", help="For a steer artifact: selected (executors/detectors) or kept.")
_TOP = typer.Option(None, "--top", help="Keep each task's first N features (a clean artifact's strongest).")
_TASKS = typer.Option(None, "--tasks", help="Tasks to measure (default: the artifact's tasks, or all).")
_N_SHOT = typer.Option(None, "--n-shot", help="Examples per prompt (default: the collect artifact's, or 19).")
_N_PROMPTS = typer.Option(None, "--n-prompts", help="Prompts per task (default: the collect artifact's n-eval, or 32).")
_MODEL = typer.Option(None, "--model", help="Model for features given by id (default: the SAE's, or toy-icl).")
_NAME = typer.Option(None, "--name", help="Name the artifact.")
_FORCE = typer.Option(False, "--force", help="Recompute even if the artifact exists.")


@app.callback(invoke_without_command=True)
def ablate_cmd(
    ctx: typer.Context,
    features: Optional[str] = typer.Option(None, "--features", help=_FEATURES_HELP),
    sae: List[str] = typer.Option([], "--sae", help="SAE for features given as LAYER:ID (repeatable, one per layer)."),
    which: str = _WHICH,
    top: Optional[int] = _TOP,
    roles: str = typer.Option("arrow", "--roles", help="Roles whose features are ablated: prompt,input,arrow,output,newline or all."),
    mode: str = typer.Option("zero", "--mode", help="zero, or mean (the feature's mean activation on tokens of that role)."),
    tasks: Optional[str] = _TASKS,
    cross_task: bool = typer.Option(False, "--cross-task", help="Ablate the features of task A, measure task B, for every A and B."),
    n_shot: Optional[int] = _N_SHOT,
    n_prompts: Optional[int] = _N_PROMPTS,
    model: Optional[str] = _MODEL,
    circuit: Optional[str] = typer.Option(None, "--circuit", help="A circuit artifact: measure its faithfulness instead."),
    max_nodes: int = typer.Option(1000, "--max-nodes", help="With --circuit: the largest node set on the faithfulness curves."),
    in_sample: bool = typer.Option(False, "--in-sample", help="With --circuit: measure on the circuit's own prompts (labelled in-sample), not held-out ones (seed + 101)."),
    rank: str = typer.Option("signed", "--rank", help="With --circuit: top n nodes by signed IE (positive first; the paper's) or abs (|IE|)."),
    name: Optional[str] = _NAME,
    force: bool = _FORCE,
) -> None:
    """Metric change per task when features are ablated at token roles of few-shot prompts."""
    if ctx.invoked_subcommand is not None:
        return
    if circuit is not None:
        try:
            from icl_cli.cli.faithfulness_cmd import faithfulness_cmd
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("icl_cli"):
                raise IclError("circuit faithfulness is not installed in this version (icl_cli/cli/faithfulness_cmd.py is missing)") from None
            raise
        return faithfulness_cmd(ctx, circuit, tasks, cross_task, max_nodes, name, force, in_sample=in_sample, rank=rank,
                                model=model, n_shot=n_shot, n_prompts=n_prompts)
    if features is None:
        raise IclError("pass --features REF|LAYER:ID,... (or --circuit REF); see `icl ablate --help`")
    from icl_cli.ablate.step import AblateRequest, run_ablate

    gl = g(ctx)
    out = run_ablate(run_env(gl), AblateRequest(features=features, sae=sae, which=which, top=top, roles=roles, mode=mode,
                                                tasks=tasks, cross_task=cross_task, n_shot=n_shot, n_prompts=n_prompts,
                                                model=model, name=name, force=force))
    emit(gl, out.data, table=lambda: _ablate_table(out.data, out.r), keys=[out.result.artifact.key])


def _ablate_table(data: dict, r):
    from rich.table import Table

    from icl_cli.ablate.view import heatmap

    out = []
    tab = Table(title=f"ablating {data['set']} ({data['mode']}) at {', '.join(data['roles'])} tokens; ablate {data['key'][:12]}")
    tab.caption = "held-out few-shot prompts; the rest of the SAE reconstruction and its error are kept"
    for col in ("features of", "measured on", "n feats", "nll clean", "nll ablated", "Δnll", "acc clean → ablated"):
        tab.add_column(col, justify="left" if col in ("features of", "measured on") else "right")
    for s, cell in data["ablated"].items():
        n = sum(len(v) for v in cell["features"].values())
        for t, m in cell["measured"].items():
            if data["cross_task"] and s != t and s in data["tasks"]:
                continue  # off-diagonal cells go to the heatmap
            b = data["base"][t]
            tab.add_row(s, t, str(n), f"{b['nll']:.3f}", f"{m['nll']:.3f}", f"{m['delta_nll']:+.3f}", f"{b['acc']:.2f} → {m['acc']:.2f}")
    out.append(tab)
    if data["cross_task"] and len(r.sets) > 1:
        hm = heatmap("Δnll, ablate the row's features, measure the column's task", r.sets, r.tasks, data["delta_nll"],
                     marks=[[s == t for t in r.tasks] for s in r.sets], fmt="{:+.3f}")
        share = data.get("own_worst_share")
        hm.caption = ("* = the task's own features; red: the loss rises when they are ablated"
                      + (f"; {100 * share:.0f}% of tasks are hurt most by their own features" if share is not None else ""))
        out.append(hm)
    return out


@app.command("mass")
def mass_cmd(
    ctx: typer.Context,
    features: str = typer.Option(..., "--features", help=_FEATURES_HELP),
    sae: List[str] = typer.Option([], "--sae", help="SAE for features given as LAYER:ID."),
    which: str = _WHICH,
    top: Optional[int] = _TOP,
    tasks: Optional[str] = _TASKS,
    n_shot: Optional[int] = _N_SHOT,
    n_prompts: Optional[int] = _N_PROMPTS,
    model: Optional[str] = _MODEL,
    name: Optional[str] = _NAME,
    force: bool = _FORCE,
) -> None:
    """Share of a feature set's activation on prompt / input / arrow / output / newline tokens (docs/METHODS.md §8)."""
    from icl_cli.ablate.step import MassRequest, run_mass

    gl = g(ctx)
    out = run_mass(run_env(gl), MassRequest(features=features, sae=sae, which=which, top=top, tasks=tasks, n_shot=n_shot,
                                            n_prompts=n_prompts, model=model, name=name, force=force))
    emit(gl, out.data, table=lambda: _mass_table(out.data), keys=[out.result.artifact.key])


def _mass_table(data: dict):
    from rich.table import Table

    roles = list(data["per_feature_percent"])
    tab = Table(title=f"activation mass of {data['set']} by token role (%): each task's best feature; ablate {data['key'][:12]}")
    tab.add_column("task")
    tab.add_column("best (of set)", justify="left")
    for role in roles:
        tab.add_column(role, justify="right")
    for t, r in data["tasks"].items():
        best = str(r["features"][0]) + (f" (of {len(r['features'])})" if len(r["features"]) > 1 else "")
        tab.add_row(t, best, *(f"{r['per_feature'][str(r['features'][0])][role]:.1f}" for role in roles))
    tab.add_row("mean of best features", "", *(f"{data['per_feature_percent'][role]:.1f}" for role in roles), style="bold")
    tab.add_row("pooled, all features", "", *(f"{data['pooled_percent'][role]:.1f}" for role in roles), style="dim")
    empty = f"; not measured (empty set): {', '.join(data['empty'])}" if data.get("empty") else ""
    tab.caption = ("inputs and outputs as whole words; paper (Gemma-1 2B, mean of one best feature per task): executors "
                   f"89.8% on arrows, detectors 96.8% on outputs{empty}")
    return tab


@app.command("link")
def link_cmd(
    ctx: typer.Context,
    detectors: str = typer.Option(..., "--detectors", help="Detectors: a detector steer artifact, a clean --detectors artifact, or LAYER:ID,... with --det-sae."),
    executors: str = typer.Option(..., "--executors", help="Executors: an executor steer artifact, a clean artifact, or LAYER:ID,... with --exe-sae."),
    det_sae: List[str] = typer.Option([], "--det-sae", help="SAE of detectors given by id (layer l−1)."),
    exe_sae: List[str] = typer.Option([], "--exe-sae", help="SAE of executors given by id (layer l)."),
    which: str = _WHICH,
    top: Optional[int] = _TOP,
    estimand: str = typer.Option("frozen-attention", "--estimand", help="frozen-attention (the paper's Fig. 8: the detector removed at every token, block l with the clean attention pattern, the executor's drop per token; executors at layer l + 1) or ablation (the ratio below through the whole model)."),
    removal: str = typer.Option("project", "--removal", help="With --estimand ablation: project (drop the residual's component), feature (zero the detector) or steer (subtract --scale × direction)."),
    scale: float = typer.Option(25.0, "--scale", help="With --removal steer: the scale of the subtracted unit direction."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Tasks whose prompts are used (default: the artifacts' tasks, or all)."),
    n_shot: Optional[int] = _N_SHOT,
    n_prompts: Optional[int] = _N_PROMPTS,
    model: Optional[str] = _MODEL,
    name: Optional[str] = _NAME,
    force: bool = _FORCE,
) -> None:
    """Detector → executor link: executor drop with the attention frozen, or the ablation ratio (docs/METHODS.md §8)."""
    from icl_cli.ablate.step import LinkRequest, run_link

    gl = g(ctx)
    out = run_link(run_env(gl), LinkRequest(detectors=detectors, executors=executors, det_sae=det_sae, exe_sae=exe_sae,
                                            which=which, top=top, estimand=estimand, removal=removal, scale=scale, tasks=tasks, n_shot=n_shot,
                                            n_prompts=n_prompts, model=model, name=name, force=force))
    emit(gl, out.data, table=lambda: _link_table(out.data), keys=[out.result.artifact.key])


def _link_table(data: dict):
    from icl_cli.ablate.view import heatmap

    if data.get("estimand") == "frozen-attention":
        from icl_cli.ablate.link_view import frozen_tables

        return frozen_tables(data)
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    title = f"detector → executor: executor activation at arrows, after / before ({data['removal']}); ablate {data['key'][:12]}"
    tab = heatmap(title, [str(d) for d in data["detectors"]], [str(e) for e in data["executors"]], data["ratio"],
                  marks=data["own"], fmt="{:.2f}", centre=1.0)
    tab.caption = (f"rows: detectors (layer {data['detector_layer']}), columns: executors (layer {data['executor_layer']}), "
                   f"* = a task's own pair. Mean ratio: own pairs {fmt(data['own_mean_ratio'])} (n={data['n_own']}), "
                   f"other pairs {fmt(data['other_mean_ratio'])} (n={data['n_other']})")
    return tab
