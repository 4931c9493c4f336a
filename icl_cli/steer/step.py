"""The steer steps as one call each (``icl steer``, ``icl steer explore``, ``icl pipeline``).

    out = run_steer(env, SteerRequest(clean="pipeline-clean"))                    # executor heatmap
    out = run_steer(env, SteerRequest(clean="pipeline-clean-detectors", mode="detector"))
    out.result.artifact.key, out.data, out.res (the SteerResult, for the heatmap tables)
    c = run_explore(env, ExploreRequest(sae="sae-5", feature=12, prompt="hot ->"))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from icl_cli.core.errors import IclError
from icl_cli.core.runenv import RunEnv


@dataclass
class SteerRequest:
    """The options of one steer run (defaults: those of ``icl steer``)."""

    clean: str
    """The clean artifact (its layer, tasks and kept features)."""
    sae: Optional[str] = None
    """SAE whose decoder directions steer (default: the clean artifact's)."""
    mode: str = "executor"
    """executor | detector | negative."""
    features: str = "all-kept"
    """all-kept (union of the kept features) or ids F1,F2."""
    tasks: str = "all"
    """all (the clean artifact's tasks) or a comma-separated subset."""
    scale: Optional[float] = None
    """Steering scale s (default 15 executor, 25 detector)."""
    scales: Optional[Sequence[float]] = None
    """Negative mode: the scales (default: logspace 1…31.6, 7 values)."""
    n_prompts: int = 32
    """Held-out prompts per task."""
    min_effect: float = 0.2
    """Executor rule: own-task relative loss decrease at least this."""
    max_other: float = 0.5
    """Executor rule: the compared tasks' effect at most this × the own one."""
    rule: str = "group"
    """Executor rule: group (compare with tasks of other task groups, the paper's) or strict (every other task)."""
    executors: Optional[str] = None
    """Negative mode: subtract each task's executors from this steer artifact."""
    normalise: bool = False
    """The summary's heatmap divided by each row's max, cells under 0.2 as 0 (paper)."""
    batch_size: int = 256
    """Prompt rows per batched pass (features × prompts)."""
    shard: Optional[str] = None
    """i/n: compute only shard i of n of the tasks (see store/shards.py)."""
    name: Optional[str] = None
    """Name the artifact."""
    force: bool = False
    """Recompute even if the artifact exists."""


@dataclass
class SteerOutcome:
    """What a steer run reports: the full artifact, its summary and result, a shard's partial, or
    nothing (a torchrun rank other than 0)."""

    result: Any = None
    """StepResult of the full steer artifact."""
    data: dict | None = None
    """Its summary document (steer/heatmaps.py:summary_json), what ``icl steer --json`` prints."""
    res: Any = None
    """The SteerResult (steer/artifact.py) the views draw."""
    part: dict | None = None
    """A shard's partial artifact (store/shards.py:part_json)."""


def run_steer(env: RunEnv, req: SteerRequest) -> SteerOutcome:
    """Steer held-out prompts with each feature: the tasks × features heatmap, executors, negative sweeps."""
    from icl_cli.clean.cleaning import read_h5 as read_clean
    from icl_cli.core.identity import model_fingerprint, tasks_digest
    from icl_cli.core.models import resolve_device, resolve_dtype
    from icl_cli.core.sites import HookedModel
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.steer import heatmaps
    from icl_cli.steer.heatmaps import FORMAT_VERSION, NEGATIVE_SCALES, PromptSource, SteerParams, read_h5, summary_json
    from icl_cli.store import StepSpec
    from icl_cli.store.sharded import run_sharded

    mode, tasks = req.mode, req.tasks
    p = SteerParams(mode=mode, scale=req.scale, scales=tuple(req.scales) if req.scales is not None else NEGATIVE_SCALES,
                    n_prompts=req.n_prompts, min_effect=req.min_effect, max_other=req.max_other, rule=req.rule, batch_size=req.batch_size)
    store = env.store
    clean_art = store.resolve(req.clean, step="clean")
    detectors = bool(clean_art.params.get("detectors"))
    if mode == "detector" and not detectors:
        raise IclError(f"clean artifact {clean_art.key[:12]} holds task-vector features, not detectors; "
                       "make one with `icl clean --detectors --sae SAE_OF_LAYER_L-1` for --mode detector")
    if mode != "detector" and detectors:
        raise IclError(f"clean artifact {clean_art.key[:12]} holds detector features (clean --detectors); "
                       "use --mode detector, or a clean artifact of task vectors")
    tv_art = store.resolve(clean_art.inputs["tv"], step="collect")
    cp = tv_art.params
    layer, cres = read_clean(clean_art.file("clean.h5"))
    sae_art, sae_ref, d = _sae(env, req.sae, clean_art, lambda cfg: _check_sae(cfg, layer, cp, clean_art.key))
    names = list(cres) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    missing = [t for t in names if t not in cres]
    if missing or not names:
        raise IclError(f"task(s) {', '.join(missing) or '(none)'} are not in clean artifact {clean_art.key[:12]}; "
                       f"it holds {', '.join(cres)}")
    kept = {t: list(cres[t].features) for t in names}
    feats, per_task, exec_art = _features(store, req.features, req.executors, p, names, kept, layer, sae_art)
    width = d.cfg.d_sae
    beyond = [f for f in feats if not 0 <= f < width]
    if beyond:
        raise IclError(f"feature id {beyond[0]} is beyond the SAE's width ({width} features, ids 0-{width - 1}); "
                       f"pass ids below {width}")
    if not feats and p.mode != "negative":
        raise IclError(f"clean artifact {clean_art.key[:12]} kept no feature for {', '.join(names)}; pass --features")
    task_list = resolve_tasks(cp["tasks"], cp.get("tasks_dir"))
    if tasks_digest(task_list) != cp["tasks_digest"]:
        raise IclError(f"the task data changed since collect artifact {tv_art.key[:12]} was made; re-run `icl collect`")
    suite = {t.name: t for t in task_list}
    src = PromptSource.from_collect(cp)
    dtype = str(resolve_dtype(env.dtype, resolve_device(env.device)))
    params = {**p.__dict__, "layer": layer, "tasks": names, "features": feats, "task_features": per_task,
              "sae": sae_ref, "dtype": dtype}
    if p.mode == "negative":
        params.pop("scale")
    else:
        params.pop("scales")
    spec = StepSpec("steer", params, {"clean": clean_art, "sae": sae_art, "executors": exec_art}, FORMAT_VERSION)
    holder = {}

    def compute(st, subset):
        from icl_cli.steer.heatmaps import write_h5

        lm = env.load_lm(cp["model"])
        if model_fingerprint(lm.model) != cp["model_fingerprint"]:
            raise IclError(f"model {cp['model']} has changed since collect artifact {tv_art.key[:12]} was made; re-run `icl collect`")
        hm = HookedModel(lm.model)
        if d.cfg.d_in != hm.d_model:
            raise IclError(f"the SAE has d_in {d.cfg.d_in} but {cp['model']} has d_model {hm.d_model}: it belongs to another model")
        with env.progress(len(subset), f"steer ({p.mode})") as advance:
            res = heatmaps.run_steer(hm, lm.tokenizer, [suite[t] for t in subset], layer, d.to(lm.device), p, src, feats,
                                     kept, per_task, cp["model"], progress=advance, work_dir=st.work_dir,
                                     device=lm.device)
        with st.h5("steer.h5") as f:
            write_h5(f, res)
        holder["res"] = res
        return {"mean_base_nll": float(res.base_nll.mean())}

    def merge(st, parts):
        from icl_cli.steer.heatmaps import merge_rows, steer_result, write_h5

        rows = merge_rows([read_h5(art.file("steer.h5")) for _, art in parts], names)
        res = steer_result(p, layer, cp["model"], names, feats, rows, kept, per_task,
                           {n: suite[n].group for n in names})
        with st.h5("steer.h5") as f:
            write_h5(f, res)
        holder["res"] = res
        return {"mean_base_nll": float(res.base_nll.mean())}

    rep = run_sharded(store, spec, names, compute, merge, shard=req.shard, name=req.name, force=req.force, say=env.log)
    if rep.result is None:
        return SteerOutcome(part=rep.part)
    out = rep.result
    env.saved(out)
    res = (not out.reused and holder.get("res")) or read_h5(out.artifact.file("steer.h5"))
    return SteerOutcome(result=out, data=summary_json(out.artifact.key, res, req.normalise), res=res)


def _sae(env: RunEnv, ref: str | None, clean_art, check):
    """(artifact or None, reference string or None, Dictionary) of --sae or of the clean artifact;
    ``check(cfg)`` runs before a folder is imported into the store."""
    from icl_cli.dictionaries.io import load_dictionary

    store = env.store
    if ref is None:
        key = clean_art.inputs.get("sae")
        ref = None if key else clean_art.params.get("sae")
        if not key and not ref:
            raise IclError(f"clean artifact {clean_art.key[:12]} does not say which SAE it used; pass --sae")
        art = store.resolve(key) if key else None
    else:
        art = store.find(ref)
    d = load_dictionary(art if art is not None else ref, store)
    check(d.cfg)
    if art is None and Path(ref).exists():  # a folder or file: keyed by its content
        art = store.import_path(ref, "sae", log=env.log).artifact
    return art, (None if art is not None else ref), d


def _check_sae(cfg, layer: int, cp: dict, clean_key: str) -> None:
    """The SAE must read resid_pre at the clean artifact's layer of the same model."""
    from icl_cli.core.models import same_model

    if cfg.site != "resid_pre":
        raise IclError(f"steering needs an SAE on resid_pre; this one is on {cfg.site}")
    if cfg.layer is not None and cfg.layer != layer:
        raise IclError(f"the SAE is for layer {cfg.layer} but clean artifact {clean_key[:12]} is at layer {layer}; "
                       f"pass an SAE of layer {layer} (or leave out --sae to use the clean artifact's)")
    if cfg.model and not same_model(cfg.model, cp["model"]):
        raise IclError(f"the SAE was trained on {cfg.model} but clean artifact {clean_key[:12]} comes from {cp['model']}; "
                       "pass an SAE of that model")
    trained_on = (cfg.extra or {}).get("model_fingerprint")
    if trained_on and trained_on != cp["model_fingerprint"]:
        raise IclError(f"the SAE was trained on other weights of {cp['model']} than clean artifact {clean_key[:12]} used; "
                       "pass the SAE the clean step used")


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise IclError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not out:
        raise IclError(f"{what} is empty; give comma-separated feature ids")
    return out


def _features(store, features: str, executors: str | None, p, names: list[str], kept: dict, layer: int, sae_art):
    """(features steered, per-task feature sets for negative mode or None, executors artifact or None)."""
    from icl_cli.steer.heatmaps import read_h5

    explicit = None if features.strip() == "all-kept" else _ints(features, "--features")
    if p.mode != "negative":
        if executors is not None:
            raise IclError("--executors is for --mode negative")
        return (explicit if explicit is not None else sorted({f for t in names for f in kept[t]})), None, None
    exec_art = None
    if explicit is not None and executors is not None:
        raise IclError("pass either --features or --executors for negative steering, not both")
    if explicit is not None:
        per_task = {t: explicit for t in names}
    elif executors is not None:
        exec_art = store.resolve(executors, step="steer")
        r = read_h5(exec_art.file("steer.h5"))
        if r.mode != "executor":
            raise IclError(f"steer artifact {exec_art.key[:12]} is a {r.mode} artifact; --executors needs an executor heatmap")
        if r.layer != layer or (sae_art is not None and exec_art.inputs.get("sae") not in (None, sae_art.key)):
            raise IclError(f"steer artifact {exec_art.key[:12]} steered another SAE or layer ({r.layer}) than this run ({layer})")
        lost = [t for t in names if t not in r.tasks]
        if lost:
            raise IclError(f"steer artifact {exec_art.key[:12]} has no executors for {', '.join(lost)}; it holds {', '.join(r.tasks)}")
        # a task without executors under the rule brings none (no fallback to its best feature)
        per_task = {t: list(r.selected[t]) for t in names}
    else:
        per_task = {t: kept[t] for t in names}
    return sorted({f for t in names for f in per_task[t]}), per_task, exec_art


@dataclass
class ExploreRequest:
    """The options of ``icl steer explore``."""

    sae: str
    """SAE reference (artifact, folder or release id)."""
    feature: int
    """Feature id."""
    prompt: str
    """Text to complete."""
    scale: float = 15.0
    """Steering scale s."""
    max_new_tokens: int = 10
    """Tokens generated greedily."""
    where: str = "last"
    """last (the prompt's last token, like the heatmap) | all."""
    model: Optional[str] = None
    """Model (default: the one the SAE was trained on)."""
    answer: Optional[str] = None
    """The expected answer: its first token's probability without and with steering is reported."""


@dataclass
class ExploreOutcome:
    completion: Any
    """steer/explore.py:Completion (plain and steered text and ids)."""
    layer: int | None
    """The SAE's layer."""
    data: dict
    """What ``icl steer explore --json`` prints."""


def run_explore(env: RunEnv, req: ExploreRequest) -> ExploreOutcome:
    """Greedy completion of a prompt without and with one feature's direction added."""
    from icl_cli.core.sites import HookedModel
    from icl_cli.dictionaries.io import load_dictionary
    from icl_cli.steer.explore import explore

    feature, scale, where = req.feature, req.scale, req.where
    if not math.isfinite(scale):
        raise IclError(f"--scale must be a finite number, got {scale}")
    store = env.store
    art = store.find(req.sae)
    d = load_dictionary(art if art is not None else req.sae, store)
    if d.cfg.site != "resid_pre":
        raise IclError(f"explore steers resid_pre; this SAE is on {d.cfg.site}")
    if not 0 <= feature < d.cfg.d_sae:
        raise IclError(f"feature id {feature} is beyond the SAE's width ({d.cfg.d_sae} features, ids 0-{d.cfg.d_sae - 1})")
    lm = env.load_lm(req.model or d.cfg.model or "toy-icl")
    hm = HookedModel(lm.model)
    if d.cfg.d_in != hm.d_model:
        raise IclError(f"the SAE has d_in {d.cfg.d_in} but the model has d_model {hm.d_model}: pass --model of the SAE")
    text = req.prompt
    c = explore(hm, lm.tokenizer, d.to(lm.device), feature, scale, text, req.max_new_tokens, where, lm.device, req.answer)
    data = {"prompt": text, "feature": feature, "scale": scale, "layer": d.cfg.layer, "where": where,
            "plain": c.plain, "steered": c.steered, "plain_ids": c.plain_ids, "steered_ids": c.steered_ids,
            "next_token": [{"id": i, "token": lm.tokenizer.decode([i]), "p_plain": a, "p_steered": b,
                            "answer": i == c.answer_id} for i, a, b in c.probs]}
    return ExploreOutcome(c, d.cfg.layer, data)
