"""``icl clean``: task vector cleaning with baselines (docs/METHODS.md §5).

    icl clean --tv COLLECT_REF --sae SAE_REF                  # λ auto, per task
    icl clean --tv COLLECT_REF --sae SAE_REF --l1 0.05        # the paper's fixed λ
    icl clean --tv COLLECT_REF --sae SAE_REF --tasks antonyms --sweep-l1 1e-3,1e-2,5e-2 --json
    icl clean --tv COLLECT_REF --sae SAE_AT_L_MINUS_1 --detectors
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from icl_cli.cli.common import load_lm, maybe_artifact, saved, task_progress
from icl_cli.cli.context import emit, g, log
from icl_cli.cli.shard_cli import SHARD_HELP, finish
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
    from icl_cli.cli.fastpath import cpu_device_dtype
    from icl_cli.clean.artifact import FORMAT_VERSION, CleanParams, read_h5, summary_json
    from icl_cli.collect.artifact import read_sweeps, task_flags
    from icl_cli.core.identity import tasks_digest
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.store import StepSpec

    gl = g(ctx)
    store = gl.store()
    p = CleanParams(l1=_l1(l1), l1_grid=_floats(l1_grid, "--l1-grid"), l1_start=l1_start, l1_tolerance=l1_tolerance, l1_slack=l1_slack, n_val=n_val, lr=lr,
                    max_steps=max_steps, patience=patience, n_train=n_train, sweep_l1=_floats(sweep_l1),
                    detectors=detectors, seed=gl.seed)
    tv_art = store.resolve(tv, step="collect")
    sae_art = maybe_artifact(store, sae)
    if sae_art is None and Path(sae).exists():  # a folder or file: keyed by its content
        sae_art = store.import_path(sae, "sae", log=lambda m: log(m, ctx_globals=gl)).artifact
    cp = tv_art.params
    layers, sweeps = read_sweeps(tv_art.file("collect.h5"), with_mass=False)
    names = list(sweeps) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    missing = [t for t in names if t not in sweeps]
    if missing:
        raise IclError(f"task(s) {', '.join(missing)} are not in collect artifact {tv_art.key[:12]}; it holds {', '.join(sweeps)}")
    task_list = resolve_tasks(cp["tasks"], cp.get("tasks_dir"))
    if tasks_digest(task_list) != cp["tasks_digest"]:
        raise IclError(f"the task data changed since collect artifact {tv_art.key[:12]} was made; re-run `icl collect`")
    suite = {t.name: t for t in task_list}
    flags = {t: task_flags(sweeps[t].sweep) for t in names}
    label = _sae_label(store, sae_art, sae)
    meta = {"l1": "auto" if p.auto else p.l1, "l1_tolerance": p.l1_tolerance if p.auto else None,
            "l1_slack": p.l1_slack if p.auto else None,
            "sae": sae_art.key if sae_art is not None else sae, "sae_label": label, "detectors": detectors}

    def spec_for(lay: int, dtype: str) -> StepSpec:
        params = {**p.key_params(), "layer": lay, "tasks": names, "sae": sae if sae_art is None else None, "dtype": dtype}
        return StepSpec("clean", params, {"tv": tv_art, "sae": sae_art}, FORMAT_VERSION)

    if estimate:
        from icl_cli.cli.estimates import clean_estimate

        return clean_estimate(gl, store, cp, tv_art, sae_art, sae, layer, p, [suite[t] for t in names])
    # a reused artifact is found from the manifests alone (no torch, no SAE load): the SAE's layer
    # is in its artifact's record, and the dtype is known without torch on a machine without GPU
    known = layer if layer is not None else _recorded_layer(sae_art)
    cpu = cpu_device_dtype(gl)
    spec = spec_for(known, cpu[1]) if known is not None and cpu is not None else None
    if spec is None or force or store.lookup(spec) is None:
        spec, d = _checked_spec(gl, store, sae_art, sae, cp, tv_art, layer, spec_for)
    else:
        d = None
    from icl_cli.store import shards as sharding

    part, torchrun = sharding.resolve(shard)
    holder = {}

    def compute(st, subset):
        from icl_cli.clean.cleaning import CleanResult, clean_task, write_h5
        from icl_cli.collect.vectors import read_h5 as read_collect
        from icl_cli.core.identity import model_fingerprint
        from icl_cli.core.sites import HookedModel
        from icl_cli.dictionaries.io import load_dictionary

        lay = spec.params["layer"]
        lm = load_lm(gl, cp["model"])
        if model_fingerprint(lm.model) != cp["model_fingerprint"]:
            raise IclError(f"model {cp['model']} has changed since collect artifact {tv_art.key[:12]} was made; re-run `icl collect`")
        hm = HookedModel(lm.model)
        dd = (d or load_dictionary(sae_art if sae_art is not None else sae, store)).to(lm.device)
        _, results = read_collect(tv_art.file("collect.h5"))
        j = layers.index(lay)
        out = {}
        # --l1 auto: every task's search starts at the same λ (--l1-start), never at the previous
        # task's: a task's λ must not depend on which tasks ran before it (nor on the sharding)
        with task_progress(gl, len(subset), "clean") as advance:
            for i, t in enumerate(subset):
                advance(t)
                part_file = st.work_dir / f"task{i}.json"  # finished tasks survive an interruption
                done = CleanResult.load(part_file) if part_file.exists() else None
                if done is None:
                    v = (results[t].dv if detectors else results[t].tv)[j].to(lm.device)
                    done = clean_task(hm, lm.tokenizer, dd, suite[t], lay, v, p, (cp["n_eval"], cp["seed"]),
                                      cp["template"], cp["n_first"], lm.device)
                    done.flags = flags[t]
                    done.save(part_file)
                out[t] = done
        with st.h5("clean.h5") as f:
            write_h5(f, lay, out, meta)
        holder["data"] = (lay, out)
        return summary_json(st.key, lay, out, meta)["mean"]

    def merge(st, parts):
        from icl_cli.clean.artifact import write_h5

        merged, lay = {}, spec.params["layer"]
        for _, art in parts:
            lay, results = read_h5(art.file("clean.h5"))
            merged.update(results)
        out = {t: merged[t] for t in names}
        with st.h5("clean.h5") as f:
            write_h5(f, lay, out, meta)
        holder["data"] = (lay, out)
        return summary_json(st.key, lay, out, meta)["mean"]

    done = sharding.run(store, spec, names, compute, merge, shard=part, torchrun=torchrun, name=name, force=force,
                        say=lambda m: log(m, ctx_globals=gl))
    if not finish(gl, done, names):
        return
    res = done.result
    saved(gl, res)
    data = summary_json(res.artifact.key, *((not res.reused and holder.get("data")) or read_h5(res.artifact.file("clean.h5"))), meta)
    emit(gl, data, table=lambda: _tables(data), keys=[res.artifact.key])


def _recorded_layer(art) -> int | None:
    """The layer a store SAE records (train-sae params, import metrics), without loading it."""
    if art is None:
        return None
    value = art.params.get("layer", art.metrics.get("layer"))
    return value if isinstance(value, int) else None


def _sae_label(store, art, ref: str) -> str:
    """How people name the SAE: key, names, architecture, width and site."""
    if art is None:
        return ref
    info = {**art.metrics, **art.params}
    names = store.names_of(art.key)
    width = info.get("width") or info.get("d_sae")
    what = ", ".join(str(x) for x in (info.get("arch"), f"{width} features" if width else None,
                                      info.get("site") and f"site {info['site']}") if x)
    return f"{art.key[:12]}" + (f" ({', '.join(names)})" if names else "") + (f": {what}" if what else "")


def _checked_spec(gl, store, sae_art, sae: str, cp: dict, tv_art, layer: int | None, spec_for):
    """The spec after loading the SAE and checking it against the task vectors (the path of a new artifact)."""
    from icl_cli.collect.vectors import read_h5 as read_collect
    from icl_cli.core.models import resolve_device, resolve_dtype
    from icl_cli.dictionaries.io import load_dictionary

    d = load_dictionary(sae_art if sae_art is not None else sae, store)
    layers, results = read_collect(tv_art.file("collect.h5"))
    lay = _check(d, cp, layers, layer, next(iter(results.values())).tv.shape[-1])
    dtype = str(resolve_dtype(gl.dtype, resolve_device(gl.device)))
    return spec_for(lay, dtype), d


def same_model(a: str, b: str) -> bool:
    """Whether two model references name the same model (preset names, HF ids and folders alike)."""
    from pathlib import Path

    from icl_cli.core.models import PRESETS

    def canon(x: str) -> str:
        x = PRESETS[x].hf_id if x in PRESETS else str(x)
        return Path(x.rstrip("/")).name.lower()

    return canon(a) == canon(b)


def _check(d, cp: dict, layers: list[int], layer: int | None, d_model: int) -> int:
    """The cleaning layer, after checking that the SAE fits the task vectors."""
    cfg = d.cfg
    if cfg.d_in != d_model:
        raise IclError(f"the SAE has d_in {cfg.d_in} but the task vectors have d_model {d_model}: it belongs to another model")
    if cfg.site != "resid_pre":
        raise IclError(f"cleaning needs an SAE on resid_pre; this one is on {cfg.site}")
    if cfg.model and not same_model(cfg.model, cp["model"]):
        raise IclError(f"the SAE was trained on {cfg.model} but the task vectors come from {cp['model']}")
    trained_on = (cfg.extra or {}).get("model_fingerprint")
    if trained_on and trained_on != cp["model_fingerprint"]:
        raise IclError(f"the SAE was trained on other weights of {cp['model']} than the task vectors came from; "
                       "retrain it (`icl train-sae`) or re-run `icl collect`")
    layer = cfg.layer if layer is None else layer
    if layer is None:
        raise IclError("the SAE does not say its layer; pass --layer")
    if cfg.layer is not None and cfg.layer != layer:
        raise IclError(f"the SAE is for layer {cfg.layer}, not --layer {layer}")
    if layer not in layers:
        raise IclError(f"the collect artifact holds layers {layers[0]}-{layers[-1]} but not {layer}; re-run `icl collect --layers {layer}`"
                       if layers == list(range(layers[0], layers[-1] + 1)) else f"the collect artifact has no layer {layer} (it has {layers})")
    return layer


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
