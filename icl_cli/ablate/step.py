"""The ablate steps as one call each (``icl ablate``, ``icl ablate mass``, ``icl ablate link``, ``icl pipeline``).

    out = run_ablate(env, AblateRequest(features="pipeline-executors", cross_task=True))
    out = run_mass(env, MassRequest(features="pipeline-detectors", which="kept"))
    out = run_link(env, LinkRequest(detectors="pipeline-detectors", executors="pipeline-executors"))
    out.result.artifact.key, out.data (what the command prints), out.r (the result its views draw)

Feature sets come from steer or clean artifacts, or LAYER:ID with the SAEs given (feature_sets.py);
the tasks, prompt settings and model are shared by the three (``_setup``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from icl_cli.core.errors import IclError
from icl_cli.core.runenv import RunEnv


@dataclass
class AblateRequest:
    """The options of one feature-set ablation (defaults: those of ``icl ablate``)."""

    features: str
    """A steer artifact (its executors/detectors), a clean artifact (kept features), or LAYER:ID,... with ``sae``."""
    sae: List[str] = field(default_factory=list)
    """SAEs for features given as LAYER:ID (one per layer)."""
    which: str = "selected"
    """For a steer artifact: selected (executors/detectors) or kept."""
    top: Optional[int] = None
    """Keep each task's first N features (a clean artifact's strongest)."""
    roles: str = "arrow"
    """Roles whose features are ablated: prompt,input,arrow,output,newline or all."""
    mode: str = "zero"
    """zero, or mean (the feature's mean activation on tokens of that role)."""
    tasks: Optional[str] = None
    """Tasks to measure (default: the artifact's tasks, or all)."""
    cross_task: bool = False
    """Ablate the features of task A, measure task B, for every A and B."""
    n_shot: Optional[int] = None
    """Examples per prompt (default: the collect artifact's, or 19)."""
    n_prompts: Optional[int] = None
    """Prompts per task (default: the collect artifact's n-eval, or 32)."""
    model: Optional[str] = None
    """Model for features given by id (default: the SAE's, or toy-icl)."""
    name: Optional[str] = None
    """Name the artifact."""
    force: bool = False
    """Recompute even if the artifact exists."""


@dataclass
class MassRequest:
    """The options of one activation-mass run (defaults: those of ``icl ablate mass``)."""

    features: str
    """As AblateRequest.features; the features of one SAE."""
    sae: List[str] = field(default_factory=list)
    which: str = "selected"
    top: Optional[int] = None
    tasks: Optional[str] = None
    n_shot: Optional[int] = None
    n_prompts: Optional[int] = None
    model: Optional[str] = None
    name: Optional[str] = None
    force: bool = False


@dataclass
class LinkRequest:
    """The options of one detector → executor link run (defaults: those of ``icl ablate link``)."""

    detectors: str
    """A detector steer artifact, a clean --detectors artifact, or LAYER:ID,... with ``det_sae``."""
    executors: str
    """An executor steer artifact, a clean artifact, or LAYER:ID,... with ``exe_sae``."""
    det_sae: List[str] = field(default_factory=list)
    """SAE of detectors given by id (layer l−1)."""
    exe_sae: List[str] = field(default_factory=list)
    """SAE of executors given by id (layer l)."""
    which: str = "selected"
    top: Optional[int] = None
    estimand: str = "frozen-attention"
    """frozen-attention (the paper's Fig. 8, ablate/link_frozen.py) or ablation (ablate/link.py)."""
    removal: str = "project"
    """With the ablation estimand: project (drop the residual's component), feature (zero the detector) or steer (subtract scale × direction)."""
    scale: float = 25.0
    """With removal steer: the scale of the subtracted unit direction."""
    tasks: Optional[str] = None
    n_shot: Optional[int] = None
    n_prompts: Optional[int] = None
    model: Optional[str] = None
    name: Optional[str] = None
    force: bool = False


@dataclass
class AblateOutcome:
    result: Any
    """StepResult of the ablate artifact."""
    data: dict
    """What the command prints with --json (the artifact's summary)."""
    r: Any
    """The result the views draw: AblateResult, MassResult, or LinkResult."""


@dataclass
class _Setup:
    task_list: list
    p: object  # AblateParams
    model: str
    fingerprint: str | None
    params: dict
    collect: object


def _setup(env: RunEnv, sources: list, tasks: Optional[str], n_shot: Optional[int], n_prompts: Optional[int],
           model: Optional[str], roles: str = "arrow", mode: str = "zero", cross_task: bool = False) -> _Setup:
    """Tasks, prompt settings and model shared by every subcommand, checked against the sources."""
    from icl_cli.ablate.feature_ablation import AblateParams
    from icl_cli.ablate.feature_sets import GIVEN
    from icl_cli.core.identity import model_info, tasks_digest
    from icl_cli.core.models import resolve_device, resolve_dtype, same_model
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
                     template=cp.get("template", "paper"), n_first=cp.get("n_first", 2), seed=cp.get("seed", env.seed),
                     cross_task=cross_task)
    fingerprint = cp.get("model_fingerprint") or model_info(model, env.trust_remote_code)[0]
    for d in saes:
        trained_on = (d.cfg.extra or {}).get("model_fingerprint")
        if trained_on and fingerprint and trained_on != fingerprint:
            raise IclError(f"an SAE was trained on other weights of {model} than the ones measured; retrain it or re-run `icl collect`")
    params = {**p.__dict__, "roles": list(p.roles), "model": model, "model_fingerprint": fingerprint,
              "tasks_digest": tasks_digest(task_list), "task_names": [t.name for t in task_list],
              "dtype": str(resolve_dtype(env.dtype, resolve_device(env.device)))}
    return _Setup(task_list, p, model, fingerprint, params, collect)


def _load(env: RunEnv, s: _Setup, saes: dict):
    """The model (checked against the collect artifact) and the dictionaries moved to its device."""
    from icl_cli.core.identity import model_fingerprint

    lm = env.load_lm(s.model)
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


def run_ablate(env: RunEnv, req: AblateRequest) -> AblateOutcome:
    """Metric change per task when features are ablated at token roles of few-shot prompts."""
    from icl_cli.ablate.feature_ablation import FORMAT_VERSION, read_h5, run_ablation, summary_json, write_h5
    from icl_cli.ablate.feature_sets import resolve_features
    from icl_cli.core.sites import HookedModel
    from icl_cli.store import StepSpec

    store = env.store
    which = req.which
    src = _top(resolve_features(store, req.features, req.sae, which), req.top)
    s = _setup(env, [src], req.tasks, req.n_shot, req.n_prompts, req.model, req.roles, req.mode, req.cross_task)
    inputs, outside = _inputs([src])
    spec = StepSpec("ablate", {**s.params, "kind": "features", "sets": src.sets, "set": which, "sae_refs": outside},
                    inputs, FORMAT_VERSION)
    holder = {}

    def build(st):
        lm, saes = _load(env, s, src.saes)
        with env.progress(len(s.task_list), "ablate") as advance:
            r = run_ablation(HookedModel(lm.model), lm.tokenizer, s.task_list, src.sets, saes, s.p, lm.device, advance)
        with st.h5("ablate.h5") as f:
            write_h5(f, r, s.p)
        holder["r"] = r
        return {"mean_delta_nll": _mean_delta(r)}

    res = store.run(spec, build, name=req.name, force=req.force, log=env.log)
    env.saved(res)
    r = holder.get("r") or read_h5(res.artifact.file("ablate.h5"))
    data = summary_json(res.artifact.key, r, s.p)
    data["set"] = src.what
    return AblateOutcome(res, data, r)


def _mean_delta(r) -> float | None:
    import torch

    d = r.ablated["nll"] - r.base["nll"][None, :]
    own = torch.tensor([[s == t for t in r.tasks] for s in r.sets]) if any(s in r.tasks for s in r.sets) else ~torch.isnan(d)
    vals = d[own & ~torch.isnan(d)]
    return float(vals.mean()) if vals.numel() else None


def run_mass(env: RunEnv, req: MassRequest) -> AblateOutcome:
    """Share of a feature set's activation on prompt / input / arrow / output / newline tokens (docs/METHODS.md §8)."""
    from icl_cli.ablate.feature_sets import resolve_features
    from icl_cli.ablate.mass import FORMAT_VERSION, feature_mass, read_h5, summary_json, write_h5
    from icl_cli.core.sites import HookedModel
    from icl_cli.store import StepSpec

    store = env.store
    which = req.which
    src = _top(resolve_features(store, req.features, req.sae, which), req.top)
    if len(src.saes) != 1:
        raise IclError("activation mass takes the features of one SAE; pass ids of one layer")
    s = _setup(env, [src], req.tasks, req.n_shot, req.n_prompts, req.model)
    key = next(iter(src.saes))
    sets = {t: by_key.get(key, []) for t, by_key in src.sets.items()}
    inputs, outside = _inputs([src])
    params = {k: v for k, v in s.params.items() if k not in ("roles", "mode", "cross_task")}
    spec = StepSpec("ablate", {**params, "kind": "mass", "sets": sets, "set": which, "sae_refs": outside}, inputs, FORMAT_VERSION)
    holder = {}

    def build(st):
        lm, saes = _load(env, s, src.saes)
        with env.progress(len(s.task_list), "mass") as advance:
            r = feature_mass(HookedModel(lm.model), lm.tokenizer, s.task_list, sets, saes[key], s.p, lm.device, advance)
        with st.h5("mass.h5") as f:
            write_h5(f, r)
        holder["r"] = r
        return {"percent": r.percent()}

    res = store.run(spec, build, name=req.name, force=req.force, log=env.log)
    env.saved(res)
    r = holder.get("r") or read_h5(res.artifact.file("mass.h5"))
    return AblateOutcome(res, summary_json(res.artifact.key, r, src.what), r)


def run_link(env: RunEnv, req: LinkRequest) -> AblateOutcome:
    """Executor activation at arrows after / before removing a detector's direction at outputs (docs/METHODS.md §8)."""
    from icl_cli.ablate import link
    from icl_cli.ablate.feature_sets import GIVEN, resolve_features
    from icl_cli.core.sites import HookedModel
    from icl_cli.store import StepSpec

    removal, scale, which = req.removal, req.scale, req.which
    if req.estimand not in link.ESTIMANDS:
        raise IclError(f"--estimand must be one of {', '.join(link.ESTIMANDS)}, not {req.estimand!r}")
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise IclError(f"--scale must be a finite number, not {scale}")
    store = env.store
    det = _top(resolve_features(store, req.detectors, req.det_sae, which), req.top)
    exe = _top(resolve_features(store, req.executors, req.exe_sae, which), req.top)
    if len(det.saes) != 1 or len(exe.saes) != 1:
        raise IclError("the link takes detectors of one SAE and executors of one SAE")
    s = _setup(env, [det, exe], req.tasks, req.n_shot, req.n_prompts, req.model, cross_task=True)
    dk, ek = next(iter(det.saes)), next(iter(exe.saes))
    names = [t.name for t in s.task_list]
    det_sets = {t: det.sets.get(t, det.sets.get(GIVEN, {})).get(dk, []) for t in names}
    exe_sets = {t: exe.sets.get(t, exe.sets.get(GIVEN, {})).get(ek, []) for t in names}
    d_ids = sorted({f for v in det_sets.values() for f in v})
    e_ids = sorted({f for v in exe_sets.values() for f in v})
    own = sorted({(d, e) for t in names for d in det_sets[t] for e in exe_sets[t]}) if det.kind != "given" and exe.kind != "given" else []
    e_tasks = {e: [t for t in names if e in exe_sets[t]] for e in e_ids} if exe.kind != "given" else None
    d_tasks = {d: [t for t in names if d in det_sets[t]] for d in d_ids} if det.kind != "given" else None
    inputs, outside = _inputs([det, exe])
    params = {k: v for k, v in s.params.items() if k not in ("roles", "mode", "cross_task")}
    ablation = req.estimand == "ablation"
    spec = StepSpec("ablate", {**params, "kind": "link", "estimand": req.estimand, "detectors": d_ids, "executors": e_ids,
                               "own": own, "executor_tasks": e_tasks, "detector_tasks": d_tasks,
                               "removal": removal if ablation else None, "scale": scale if ablation and removal == "steer" else None,
                               "set": which, "sae_refs": outside}, inputs, link.FORMAT_VERSION)
    holder = {}

    def build(st):
        lm, saes = _load(env, s, {**det.saes, **exe.saes})
        with env.progress(len(s.task_list), "link") as advance:
            r, attrs = link.measure(req.estimand, HookedModel(lm.model), lm.tokenizer, s.task_list, saes[dk], d_ids, saes[ek],
                                    e_ids, s.p, removal, scale, own, e_tasks, d_tasks, lm.device, advance)
        with st.h5("link.h5") as f:
            link.write_result(f, r, attrs)
        holder["r"] = (r, attrs)
        return link.store_summary(r, attrs)

    res = store.run(spec, build, name=req.name, force=req.force, log=env.log)
    env.saved(res)
    r, attrs = holder.get("r") or link.read_h5(res.artifact.file("link.h5"))
    return AblateOutcome(res, link.summary_json(res.artifact.key, r, attrs), r)
