"""The clean step as one call (``icl clean``, ``icl pipeline``): task or detector vectors of a
collect artifact cleaned with an SAE, published as a clean artifact (sharded by task on request).

    out = run_clean(env, CleanRequest(tv="pipeline-tv", sae="sae-5", l1=0.005))
    out.result.artifact.key, out.data["summary"]

The artifact is found from the manifests alone when it exists (no torch, no SAE load): the SAE's
layer is in its artifact's record and the dtype is known without torch on a machine without GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from icl_cli.clean.artifact import AUTO_L1_GRID
from icl_cli.core.errors import IclError
from icl_cli.core.runenv import RunEnv


@dataclass
class CleanRequest:
    """The options of one clean run (defaults: those of ``icl clean``)."""

    tv: str
    """The collect artifact holding the task vectors."""
    sae: str
    """SAE for resid_pre at the cleaning layer (ref, folder or release id)."""
    layer: int | None = None
    """Layer (default: the SAE's)."""
    l1: float | None = None
    """L1 coefficient λ; None: auto (per task, the largest λ of ``l1_grid`` that keeps the validation nll)."""
    l1_grid: tuple[float, ...] = AUTO_L1_GRID
    """λs tried by auto (largest first)."""
    l1_start: float = 0.01
    """auto: the grid λ every task's search starts from."""
    l1_tolerance: float = 0.1
    """auto: allowed relative rise of the validation nll over the raw vector's."""
    l1_slack: float = 0.01
    """auto: nats of validation nll always allowed on top of the tolerance."""
    n_val: int = 24
    """auto: validation prompts."""
    lr: float = 0.01
    """Adam learning rate."""
    max_steps: int = 1000
    """At most this many steps per task."""
    patience: int = 200
    """Early stopping: steps without a new minimum L0."""
    n_train: int = 24
    """0-shot training prompts per task."""
    sweep_l1: tuple[float, ...] = ()
    """Also clean with each of these λ."""
    tasks: str = "all"
    """all (the artifact's tasks) or a comma-separated subset."""
    detectors: bool = False
    """Clean the detector vectors (output tokens) instead (the SAE of layer l − 1)."""
    shard: str | None = None
    """i/n: compute only shard i of n of the tasks (see store/shards.py)."""
    name: str | None = None
    """Name the artifact."""
    force: bool = False
    """Recompute even if the artifact exists."""


@dataclass
class CleanOutcome:
    """What a clean run reports: the full artifact and its summary, a shard's partial, or nothing
    (a torchrun rank other than 0)."""

    result: Any = None
    """StepResult of the full clean artifact."""
    data: dict | None = None
    """Its summary document (clean/artifact.py:summary_json), what ``icl clean --json`` prints."""
    part: dict | None = None
    """A shard's partial artifact (store/shards.py:part_json)."""


@dataclass
class CleanInputs:
    """A clean run's inputs, resolved and checked (what the run and its estimate share)."""

    p: Any
    """CleanParams."""
    tv_art: Any
    sae_art: Any
    """The SAE's artifact, or None for an SAE outside the store (a release id)."""
    cp: dict
    """The collect artifact's parameters."""
    layers: list[int]
    names: list[str]
    suite: dict
    """task name -> Task."""
    flags: dict
    meta: dict
    """The clean artifact's attributes (λ, SAE)."""

    def spec_for(self, lay: int, dtype: str, sae: str):
        from icl_cli.clean.artifact import FORMAT_VERSION
        from icl_cli.store import StepSpec

        params = {**self.p.key_params(), "layer": lay, "tasks": self.names,
                  "sae": sae if self.sae_art is None else None, "dtype": dtype}
        return StepSpec("clean", params, {"tv": self.tv_art, "sae": self.sae_art}, FORMAT_VERSION)


def clean_inputs(env: RunEnv, req: CleanRequest) -> CleanInputs:
    """Resolve the collect artifact and the SAE (a folder or file is imported into the store), and
    check the tasks against the collect artifact."""
    from icl_cli.clean.artifact import CleanParams
    from icl_cli.collect.artifact import read_sweeps, task_flags
    from icl_cli.core.identity import tasks_digest
    from icl_cli.core.tasks import resolve_tasks

    store = env.store
    p = CleanParams(l1=req.l1, l1_grid=req.l1_grid, l1_start=req.l1_start, l1_tolerance=req.l1_tolerance,
                    l1_slack=req.l1_slack, n_val=req.n_val, lr=req.lr, max_steps=req.max_steps, patience=req.patience,
                    n_train=req.n_train, sweep_l1=req.sweep_l1, detectors=req.detectors, seed=env.seed)
    tv_art = store.resolve(req.tv, step="collect")
    sae, tasks = req.sae, req.tasks
    sae_art = store.find(sae)
    if sae_art is None and Path(sae).exists():  # a folder or file: keyed by its content
        sae_art = store.import_path(sae, "sae", log=env.log).artifact
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
            "sae": sae_art.key if sae_art is not None else sae, "sae_label": label, "detectors": req.detectors}
    return CleanInputs(p, tv_art, sae_art, cp, layers, names, suite, flags, meta)


def run_clean(env: RunEnv, req: CleanRequest) -> CleanOutcome:
    """Clean the task (or detector) vectors of ``req.tv`` with ``req.sae``: reuse, compute, or
    compute / assemble shards."""
    from icl_cli.clean.artifact import read_h5, summary_json
    from icl_cli.store.sharded import run_sharded

    store = env.store
    ins = clean_inputs(env, req)
    p, tv_art, sae_art, cp, layers, names, suite, flags, meta = (ins.p, ins.tv_art, ins.sae_art, ins.cp, ins.layers,
                                                                 ins.names, ins.suite, ins.flags, ins.meta)
    sae, layer, detectors = req.sae, req.layer, req.detectors
    spec_for = lambda lay, dtype: ins.spec_for(lay, dtype, sae)  # noqa: E731
    # a reused artifact is found from the manifests alone (no torch, no SAE load): the SAE's
    # layer is in its artifact's record, and the dtype is known without torch on a machine without GPU
    known = layer if layer is not None else _recorded_layer(sae_art)
    cpu = env.cpu_device_dtype()
    spec = spec_for(known, cpu[1]) if known is not None and cpu is not None else None
    if spec is None or req.force or store.lookup(spec) is None:
        spec, d = checked_spec(env, sae_art, sae, cp, tv_art, layer, spec_for)
    else:
        d = None
    holder = {}

    def compute(st, subset):
        from icl_cli.clean.cleaning import CleanResult, clean_task, write_h5
        from icl_cli.collect.vectors import read_h5 as read_collect
        from icl_cli.core.identity import model_fingerprint
        from icl_cli.core.sites import HookedModel
        from icl_cli.dictionaries.io import load_dictionary

        lay = spec.params["layer"]
        lm = env.load_lm(cp["model"])
        if model_fingerprint(lm.model) != cp["model_fingerprint"]:
            raise IclError(f"model {cp['model']} has changed since collect artifact {tv_art.key[:12]} was made; re-run `icl collect`")
        hm = HookedModel(lm.model)
        dd = (d or load_dictionary(sae_art if sae_art is not None else sae, store)).to(lm.device)
        _, results = read_collect(tv_art.file("collect.h5"))
        j = layers.index(lay)
        out = {}
        # --l1 auto: every task's search starts at the same λ (--l1-start), never at the previous
        # task's: a task's λ must not depend on which tasks ran before it (nor on the sharding)
        with env.progress(len(subset), "clean") as advance:
            for i, t in enumerate(subset):
                advance(t)
                part_file = st.work_dir / f"task{i}.json"  # finished tasks survive an interruption
                done = CleanResult.load(part_file) if part_file.exists() else None
                if done is None:
                    v = (results[t].dv if detectors else results[t].tv)[j].to(lm.device)
                    done = clean_task(hm, lm.tokenizer, dd, suite[t], lay, v, p, (cp["n_eval"], cp["seed"]),
                                      cp["template"], cp["n_first"], lm.device,
                                      tick=lambda where, t=t: advance(f"… {t}: {where}"))
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

    rep = run_sharded(store, spec, names, compute, merge, shard=req.shard, name=req.name, force=req.force, say=env.log)
    if rep.result is None:
        return CleanOutcome(part=rep.part)
    res = rep.result
    env.saved(res)
    data = summary_json(res.artifact.key, *((not res.reused and holder.get("data")) or read_h5(res.artifact.file("clean.h5"))), meta)
    return CleanOutcome(result=res, data=data)


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


def checked_spec(env: RunEnv, sae_art, sae: str, cp: dict, tv_art, layer: int | None, spec_for: Callable):
    """(spec_for(layer, dtype), Dictionary) after loading the SAE and checking it against the task
    vectors (the path of a new artifact)."""
    from icl_cli.collect.vectors import read_h5 as read_collect
    from icl_cli.core.models import resolve_device, resolve_dtype
    from icl_cli.dictionaries.io import load_dictionary

    d = load_dictionary(sae_art if sae_art is not None else sae, env.store)
    layers, results = read_collect(tv_art.file("collect.h5"))
    lay = _check(d, cp, layers, layer, next(iter(results.values())).tv.shape[-1])
    dtype = str(resolve_dtype(env.dtype, resolve_device(env.device)))
    return spec_for(lay, dtype), d


def _check(d, cp: dict, layers: list[int], layer: int | None, d_model: int) -> int:
    """The cleaning layer, after checking that the SAE fits the task vectors."""
    from icl_cli.core.models import same_model

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
