"""``icl ablate``: causal tests of feature sets (issue 9; SPEC §7-8).

    icl ablate --features STEER_OR_CLEAN_REF --roles arrow --mode zero [--cross-task]
    icl ablate --features 5:12,5:40 --sae SAE_REF --roles arrow,output --tasks antonyms,en_es
    icl ablate mass --features STEER_REF                  # activation mass by token role
    icl ablate link --detectors DET_STEER --executors EXE_STEER
    icl ablate --circuit CIRCUIT_REF --max-nodes 500      # faithfulness of a circuit (icl circuit)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import typer

from icl_cli.cli.common import load_lm, saved, task_progress
from icl_cli.cli.context import emit, g, log
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


@dataclass
class _Setup:
    task_list: list
    p: object  # AblateParams
    model: str
    fingerprint: str | None
    params: dict
    collect: object


def _setup(gl, sources: list, tasks: Optional[str], n_shot: Optional[int], n_prompts: Optional[int],
           model: Optional[str], roles: str = "arrow", mode: str = "zero", cross_task: bool = False) -> _Setup:
    """Tasks, prompt settings and model shared by every subcommand, checked against the sources."""
    from icl_cli.ablate.feature_ablation import AblateParams
    from icl_cli.ablate.feature_sets import GIVEN
    from icl_cli.core.models import same_model
    from icl_cli.core.identity import model_info, tasks_digest
    from icl_cli.core.models import resolve_device, resolve_dtype
    from icl_cli.core.tasks import resolve_tasks

    collect = next((s.collect for s in sources if s.collect is not None), None)
    cp = collect.params if collect is not None else {}
    for s in sources:
        if s.collect is not None and collect is not None and s.collect.key != collect.key:
            raise IclError(f"the feature sets come from different collect artifacts ({collect.key[:12]}, {s.collect.key[:12]}); use sets built on the same task vectors")
    saes = [d for s in sources for d in s.saes.values()]
    model = cp.get("model") or model or next((d.cfg.model for d in saes if d.cfg.model), None) or "toy-icl"
    for d in saes:
        if d.cfg.model and not same_model(d.cfg.model, model):
            raise IclError(f"an SAE was trained on {d.cfg.model} but the features are measured on {model}; pass SAEs of {model}")
    suite = resolve_tasks(cp.get("tasks", "all"), cp.get("tasks_dir"))
    if cp and tasks_digest(suite) != cp["tasks_digest"]:
        raise IclError(f"the task data changed since collect artifact {collect.key[:12]} was made; re-run `icl collect`")
    by_name = {t.name: t for t in suite}
    per_task = [n for s in sources if s.kind != "given" for n in s.sets]
    if tasks:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        task_list = [by_name[n] if n in by_name else resolve_tasks(n)[0] for n in names] if cp else resolve_tasks(tasks)
    else:
        task_list = [by_name[n] for n in dict.fromkeys(per_task) if n in by_name] if per_task else suite
    if not task_list:
        raise IclError("no task to measure: the feature sets name no task of the suite; pass --tasks")
    all_given = all(s.kind == "given" or GIVEN in s.sets for s in sources)
    if not all_given:
        missing = [t.name for t in task_list if not any(t.name in s.sets for s in sources)]
        if missing and not cross_task:
            raise IclError(f"task(s) {', '.join(missing)} have no feature set in the artifact; drop them from --tasks or pass --cross-task")
    p = AblateParams(roles=tuple(r.strip() for r in roles.split(",") if r.strip()), mode=mode,
                     n_shot=n_shot or cp.get("n_shot", 19), n_eval=n_prompts or cp.get("n_eval", 32),
                     template=cp.get("template", "paper"), n_first=cp.get("n_first", 2), seed=cp.get("seed", gl.seed),
                     cross_task=cross_task)
    fingerprint = cp.get("model_fingerprint") or model_info(model, gl.trust_remote_code)[0]
    for d in saes:
        trained_on = (d.cfg.extra or {}).get("model_fingerprint")
        if trained_on and fingerprint and trained_on != fingerprint:
            raise IclError(f"an SAE was trained on other weights of {model} than the ones measured; retrain it or re-run `icl collect`")
    params = {**p.__dict__, "roles": list(p.roles), "model": model, "model_fingerprint": fingerprint,
              "tasks_digest": tasks_digest(task_list), "task_names": [t.name for t in task_list],
              "dtype": str(resolve_dtype(gl.dtype, resolve_device(gl.device)))}
    return _Setup(task_list, p, model, fingerprint, params, collect)


def _load(gl, s: _Setup, saes: dict):
    """The model (checked against the collect artifact) and the dictionaries moved to its device."""
    from icl_cli.core.identity import model_fingerprint

    lm = load_lm(gl, s.model)
    if s.fingerprint and model_fingerprint(lm.model) != s.fingerprint and s.collect is not None:
        raise IclError(f"model {s.model} has changed since collect artifact {s.collect.key[:12]} was made; re-run `icl collect`")
    for key, d in saes.items():
        if d.cfg.d_in != lm.d_model:
            raise IclError(f"SAE {key[:12]} has d_in {d.cfg.d_in} but {s.model} has d_model {lm.d_model}: it belongs to another model")
    return lm, {k: d.to(lm.device) for k, d in saes.items()}


def _top(src, top: Optional[int]):
    """Keep each set's first ``top`` features (a clean artifact lists them by weight, strongest first)."""
    if top is not None:
        if top < 1:
            raise IclError(f"--top must be ≥ 1, not {top}")
        src.sets = {name: {k: list(ids)[:top] for k, ids in by_key.items()} for name, by_key in src.sets.items()}
    return src


def _inputs(sources: list) -> tuple[dict, dict]:
    """(store inputs, refs of SAEs outside the store) for an artifact key."""
    inputs, outside = {}, {}
    for i, s in enumerate(sources):
        inputs[f"features{i}"] = s.artifact
        for j, (k, a) in enumerate(s.sae_arts.items()):
            if a is not None:
                inputs[f"sae{i}_{j}"] = a
            else:
                outside[f"sae{i}_{j}"] = k
    return inputs, outside


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
        return faithfulness_cmd(ctx, circuit, tasks, cross_task, max_nodes, name, force)
    if features is None:
        raise IclError("pass --features REF|LAYER:ID,... (or --circuit REF); see `icl ablate --help`")
    from icl_cli.ablate.feature_ablation import FORMAT_VERSION, read_h5, run_ablation, summary_json, write_h5
    from icl_cli.ablate.feature_sets import resolve_features
    from icl_cli.core.sites import HookedModel
    from icl_cli.store import StepSpec

    gl = g(ctx)
    store = gl.store()
    src = _top(resolve_features(store, features, sae, which), top)
    s = _setup(gl, [src], tasks, n_shot, n_prompts, model, roles, mode, cross_task)
    inputs, outside = _inputs([src])
    spec = StepSpec("ablate", {**s.params, "kind": "features", "sets": src.sets, "set": which, "sae_refs": outside},
                    inputs, FORMAT_VERSION)
    holder = {}

    def build(st):
        lm, saes = _load(gl, s, src.saes)
        with task_progress(gl, len(s.task_list), "ablate") as advance:
            r = run_ablation(HookedModel(lm.model), lm.tokenizer, s.task_list, src.sets, saes, s.p, lm.device, advance)
        with st.h5("ablate.h5") as f:
            write_h5(f, r, s.p)
        holder["r"] = r
        return {"mean_delta_nll": _mean_delta(r)}

    res = store.run(spec, build, name=name, force=force, log=lambda m: log(m, ctx_globals=gl))
    saved(gl, res)
    r = holder.get("r") or read_h5(res.artifact.file("ablate.h5"))
    data = summary_json(res.artifact.key, r, s.p)
    data["set"] = src.what
    emit(gl, data, table=lambda: _ablate_table(data, r), keys=[res.artifact.key])


def _mean_delta(r) -> float | None:
    import torch

    d = r.ablated["nll"] - r.base["nll"][None, :]
    own = torch.tensor([[s == t for t in r.tasks] for s in r.sets]) if any(s in r.tasks for s in r.sets) else ~torch.isnan(d)
    vals = d[own & ~torch.isnan(d)]
    return float(vals.mean()) if vals.numel() else None


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
    from icl_cli.ablate.mass import FORMAT_VERSION, feature_mass, read_h5, summary_json, write_h5
    from icl_cli.ablate.feature_sets import resolve_features
    from icl_cli.core.sites import HookedModel
    from icl_cli.store import StepSpec

    gl = g(ctx)
    store = gl.store()
    src = _top(resolve_features(store, features, sae, which), top)
    if len(src.saes) != 1:
        raise IclError("activation mass takes the features of one SAE; pass ids of one layer")
    s = _setup(gl, [src], tasks, n_shot, n_prompts, model)
    key = next(iter(src.saes))
    sets = {t: by_key.get(key, []) for t, by_key in src.sets.items()}
    inputs, outside = _inputs([src])
    params = {k: v for k, v in s.params.items() if k not in ("roles", "mode", "cross_task")}
    spec = StepSpec("ablate", {**params, "kind": "mass", "sets": sets, "set": which, "sae_refs": outside}, inputs, FORMAT_VERSION)
    holder = {}

    def build(st):
        lm, saes = _load(gl, s, src.saes)
        with task_progress(gl, len(s.task_list), "mass") as advance:
            r = feature_mass(HookedModel(lm.model), lm.tokenizer, s.task_list, sets, saes[key], s.p, lm.device, advance)
        with st.h5("mass.h5") as f:
            write_h5(f, r)
        holder["r"] = r
        return {"percent": r.percent()}

    res = store.run(spec, build, name=name, force=force, log=lambda m: log(m, ctx_globals=gl))
    saved(gl, res)
    r = holder.get("r") or read_h5(res.artifact.file("mass.h5"))
    data = summary_json(res.artifact.key, r, src.what)
    emit(gl, data, table=lambda: _mass_table(data), keys=[res.artifact.key])


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
    removal: str = typer.Option("project", "--removal", help="project (drop the residual's component), feature (zero the detector) or steer (subtract --scale × direction)."),
    scale: float = typer.Option(25.0, "--scale", help="With --removal steer: the scale of the subtracted unit direction."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Tasks whose prompts are used (default: the artifacts' tasks, or all)."),
    n_shot: Optional[int] = _N_SHOT,
    n_prompts: Optional[int] = _N_PROMPTS,
    model: Optional[str] = _MODEL,
    name: Optional[str] = _NAME,
    force: bool = _FORCE,
) -> None:
    """Executor activation at arrows after / before removing a detector's direction at outputs (docs/METHODS.md §8)."""
    from icl_cli.ablate.link import FORMAT_VERSION, read_h5, run_link, summary_json, write_h5
    from icl_cli.ablate.feature_sets import GIVEN, resolve_features
    from icl_cli.core.sites import HookedModel
    from icl_cli.store import StepSpec

    if scale != scale or scale in (float("inf"), float("-inf")):
        raise IclError(f"--scale must be a finite number, not {scale}")
    gl = g(ctx)
    store = gl.store()
    det = _top(resolve_features(store, detectors, det_sae, which), top)
    exe = _top(resolve_features(store, executors, exe_sae, which), top)
    if len(det.saes) != 1 or len(exe.saes) != 1:
        raise IclError("the link takes detectors of one SAE and executors of one SAE")
    s = _setup(gl, [det, exe], tasks, n_shot, n_prompts, model, cross_task=True)
    dk, ek = next(iter(det.saes)), next(iter(exe.saes))
    names = [t.name for t in s.task_list]
    det_sets = {t: det.sets.get(t, det.sets.get(GIVEN, {})).get(dk, []) for t in names}
    exe_sets = {t: exe.sets.get(t, exe.sets.get(GIVEN, {})).get(ek, []) for t in names}
    d_ids = sorted({f for v in det_sets.values() for f in v})
    e_ids = sorted({f for v in exe_sets.values() for f in v})
    own = sorted({(d, e) for t in names for d in det_sets[t] for e in exe_sets[t]}) if det.kind != "given" and exe.kind != "given" else []
    e_tasks = {e: [t for t in names if e in exe_sets[t]] for e in e_ids} if exe.kind != "given" else None
    inputs, outside = _inputs([det, exe])
    params = {k: v for k, v in s.params.items() if k not in ("roles", "mode", "cross_task")}
    spec = StepSpec("ablate", {**params, "kind": "link", "detectors": d_ids, "executors": e_ids, "own": own,
                               "executor_tasks": e_tasks, "removal": removal, "scale": scale if removal == "steer" else None,
                               "set": which, "sae_refs": outside}, inputs, FORMAT_VERSION)
    holder = {}

    def build(st):
        lm, saes = _load(gl, s, {**det.saes, **exe.saes})
        with task_progress(gl, len(s.task_list), "link") as advance:
            r = run_link(HookedModel(lm.model), lm.tokenizer, s.task_list, saes[dk], d_ids, saes[ek], e_ids, s.p,
                         removal, scale, own, e_tasks, lm.device, advance)
        layers = (saes[dk].cfg.layer, saes[ek].cfg.layer)
        with st.h5("link.h5") as f:
            write_h5(f, r, removal, scale, layers)
        holder["r"] = (r, {"removal": removal, "scale": scale, "detector_layer": layers[0], "executor_layer": layers[1]})
        own_mean, other_mean, _, _ = r.own_vs_other()
        return {"own_mean_ratio": own_mean, "other_mean_ratio": other_mean}

    res = store.run(spec, build, name=name, force=force, log=lambda m: log(m, ctx_globals=gl))
    saved(gl, res)
    r, attrs = holder.get("r") or read_h5(res.artifact.file("link.h5"))
    data = summary_json(res.artifact.key, r, attrs)
    emit(gl, data, table=lambda: _link_table(data), keys=[res.artifact.key])


def _link_table(data: dict):
    from icl_cli.ablate.view import heatmap

    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    title = f"detector → executor: executor activation at arrows, after / before ({data['removal']}); ablate {data['key'][:12]}"
    tab = heatmap(title, [str(d) for d in data["detectors"]], [str(e) for e in data["executors"]], data["ratio"],
                  marks=data["own"], fmt="{:.2f}", centre=1.0)
    tab.caption = (f"rows: detectors (layer {data['detector_layer']}), columns: executors (layer {data['executor_layer']}), "
                   f"* = a task's own pair. Mean ratio: own pairs {fmt(data['own_mean_ratio'])} (n={data['n_own']}), "
                   f"other pairs {fmt(data['other_mean_ratio'])} (n={data['n_other']})")
    return tab
