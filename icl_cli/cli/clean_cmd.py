"""``icl clean``: task vector cleaning with baselines (SPEC §5).

    icl clean --tv COLLECT_REF --sae SAE_REF
    icl clean --tv COLLECT_REF --sae SAE_REF --tasks antonyms --sweep-l1 1e-3,1e-2,5e-2 --json
    icl clean --tv COLLECT_REF --sae SAE_AT_L_MINUS_1 --detectors
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from icl_cli.cli.common import load_lm, maybe_artifact, saved, task_progress
from icl_cli.cli.context import emit, g, log
from icl_cli.errors import IclError


def register(app: typer.Typer) -> None:
    app.command("clean")(clean_cmd)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise IclError(f"cannot read {text!r} as a comma-separated list of numbers") from None


def clean_cmd(
    ctx: typer.Context,
    tv: str = typer.Option(..., "--tv", help="The collect artifact holding the task vectors."),
    sae: str = typer.Option(..., "--sae", help="SAE for resid_pre at the cleaning layer (ref, folder or release id)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer (default: the SAE's)."),
    l1: float = typer.Option(0.05, "--l1", help="L1 coefficient λ."),
    lr: float = typer.Option(0.01, "--lr", help="Adam learning rate."),
    max_steps: int = typer.Option(1000, "--max-steps", help="At most this many steps per task."),
    patience: int = typer.Option(200, "--patience", help="Early stopping: steps without a new minimum L0."),
    n_train: int = typer.Option(24, "--n-train", help="0-shot training prompts per task."),
    sweep_l1: str = typer.Option("", "--sweep-l1", help="Also clean with each λ of this comma-separated list."),
    tasks: str = typer.Option("all", "--tasks", help="all (the artifact's tasks) or a comma-separated subset."),
    detectors: bool = typer.Option(False, "--detectors", help="Clean the detector vectors (output tokens) instead; pass the SAE of layer l−1 (SPEC §6)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name the artifact."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the artifact exists."),
) -> None:
    """Clean task vectors into a few SAE features that keep the task (plus the baselines)."""
    from icl_cli.clean import FORMAT_VERSION, CleanParams, CleanResult, clean_task, read_h5, summary_json, write_h5
    from icl_cli.collect import read_h5 as read_collect
    from icl_cli.core.identity import model_fingerprint, tasks_digest
    from icl_cli.core.models import resolve_device, resolve_dtype
    from icl_cli.core.sites import HookedModel
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.dictionaries.io import load_dictionary
    from icl_cli.store import StepSpec

    gl = g(ctx)
    store = gl.store()
    p = CleanParams(l1=l1, lr=lr, max_steps=max_steps, patience=patience, n_train=n_train,
                    sweep_l1=_floats(sweep_l1), detectors=detectors, seed=gl.seed)
    tv_art = store.resolve(tv, step="collect")
    sae_art = maybe_artifact(store, sae)
    if sae_art is None and Path(sae).exists():  # a folder or file: keyed by its content
        sae_art = store.import_path(sae, "sae", log=lambda m: log(m, ctx_globals=gl)).artifact
    d = load_dictionary(sae_art if sae_art is not None else sae, store)
    cp = tv_art.params
    layers, results = read_collect(tv_art.file("collect.h5"))
    layer = _check(d, cp, layers, layer, next(iter(results.values())).tv.shape[-1])
    names = list(results) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    missing = [t for t in names if t not in results]
    if missing:
        raise IclError(f"task(s) {', '.join(missing)} are not in collect artifact {tv_art.key[:12]}; it holds {', '.join(results)}")
    task_list = resolve_tasks(cp["tasks"], cp.get("tasks_dir"))
    if tasks_digest(task_list) != cp["tasks_digest"]:
        raise IclError(f"the task data changed since collect artifact {tv_art.key[:12]} was made; re-run `icl collect`")
    suite = {t.name: t for t in task_list}
    dtype = str(resolve_dtype(gl.dtype, resolve_device(gl.device)))
    params = {**p.__dict__, "layer": layer, "tasks": names, "sae": sae if sae_art is None else None, "dtype": dtype}
    spec = StepSpec("clean", params, {"tv": tv_art, "sae": sae_art}, FORMAT_VERSION)
    holder = {}

    def build(st):
        lm = load_lm(gl, cp["model"])
        if model_fingerprint(lm.model) != cp["model_fingerprint"]:
            raise IclError(f"model {cp['model']} has changed since collect artifact {tv_art.key[:12]} was made; re-run `icl collect`")
        hm = HookedModel(lm.model)
        dd = d.to(lm.device)
        j = layers.index(layer)
        out = {}
        with task_progress(gl, len(names), "clean") as advance:
            for i, t in enumerate(names):
                advance(t)
                part = st.work_dir / f"task{i}.json"  # finished tasks survive an interruption
                done = CleanResult.load(part) if part.exists() else None
                if done is None:
                    v = (results[t].dv if detectors else results[t].tv)[j].to(lm.device)
                    done = clean_task(hm, lm.tokenizer, dd, suite[t], layer, v, p, (cp["n_eval"], cp["seed"]),
                                      cp["template"], cp["n_first"], lm.device)
                    done.save(part)
                out[t] = done
        with st.h5("clean.h5") as f:
            write_h5(f, layer, out)
        holder["data"] = (layer, out)
        return summary_json(st.key, layer, out)["mean"]

    res = store.run(spec, build, name=name, force=force, log=lambda m: log(m, ctx_globals=gl))
    saved(gl, res)
    data = summary_json(res.artifact.key, *(holder.get("data") or read_h5(res.artifact.file("clean.h5"))))
    emit(gl, data, table=lambda: _table(data), keys=[res.artifact.key])


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


def _table(data: dict):
    from rich.table import Table

    tab = Table(title=f"task vector cleaning at layer {data['layer']}; clean {data['key'][:12]}")
    for col in ("task", "kept features (weight)", "L0 recon→cleaned", "nll 0-shot", "TV", "recon", "cleaned", "ito5", "ito20"):
        tab.add_column(col, justify="left" if col.startswith(("task", "kept")) else "right")
    for t, r in data["tasks"].items():
        feats = ", ".join(f"{f}({w:.1f})" for f, w in list(zip(r["features"], r["weights"]))[:6])
        if len(r["features"]) > 6:
            feats += ", …"
        n = r["nll"]
        tab.add_row(t, feats, f"{r['l0']['recon']}→{r['l0']['cleaned']}", f"{n['zero_shot']:.2f}", f"{n['tv']:.2f}",
                    f"{n['recon']:.2f}", f"{n['cleaned']:.2f}", f"{n.get('ito_5', float('nan')):.2f}",
                    f"{n.get('ito_20', float('nan')):.2f}")
    m = data["mean"]
    tab.caption = (f"mean L0 {m['l0_recon']:.1f} → {m['l0_cleaned']:.1f} (fraction {m['l0_fraction']:.2f}); "
                   f"mean nll TV {m['nll_tv']:.3f}, cleaned {m['nll_cleaned']:.3f}, 0-shot {m['nll_zero_shot']:.3f}")
    return tab
