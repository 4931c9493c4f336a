"""The collect steps as one call each (``icl collect``, ``icl collect top-activations``, ``icl pipeline``).

    out = run_collect(env, CollectRequest(model="toy-icl", tasks="antonyms,en_es"))
    out.result.artifact.key, out.data["best_layer"]
    top = run_top_activations(env, TopRequest(sae="sae-5", features=(12, 40)))

An existing collect artifact is reused without loading the model or importing torch: its key
comes from the model's config and files, and the device from the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from icl_cli.core.errors import IclError
from icl_cli.core.runenv import RunEnv


@dataclass
class CollectRequest:
    """The options of one collect run (defaults: those of ``icl collect``)."""

    model: str = "toy-icl"
    """Preset, HF id or local folder."""
    tasks: str = "all"
    """all, or a comma-separated list of task names / JSON files."""
    tasks_dir: Optional[Path] = None
    """Folder of task files to use as the suite."""
    layers: str = "all"
    """all, 5, 2-7 or 1,3,5."""
    n_shot: int = 19
    """Examples per few-shot prompt."""
    n_prompts: int = 16
    """Few-shot prompts averaged into each task vector."""
    n_eval: int = 32
    """Held-out prompts for the sweep metrics."""
    template: str = "paper"
    """paper | hendel | todd."""
    n_first: int = 2
    """Answer tokens scored by nll."""
    saes: Sequence[str] = field(default_factory=list)
    """SAE references for activation mass by role."""
    shard: Optional[str] = None
    """i/n: compute only shard i of n of the tasks (see store/shards.py)."""
    name: Optional[str] = None
    """Name the artifact."""
    force: bool = False
    """Recompute even if the artifact exists."""


@dataclass
class CollectOutcome:
    """What a collect run reports: the full artifact and its summary, a shard's partial, or nothing
    (a torchrun rank other than 0)."""

    result: Any = None
    """StepResult of the full collect artifact."""
    data: dict | None = None
    """Its summary document (collect/artifact.py:summary_json), what ``icl collect --json`` prints."""
    part: dict | None = None
    """A shard's partial artifact (store/shards.py:part_json)."""


def run_collect(env: RunEnv, req: CollectRequest) -> CollectOutcome:
    """Task vectors, detector vectors and the layer sweep of ``req.tasks`` on ``req.model``."""
    from icl_cli.collect.artifact import FORMAT_VERSION, CollectParams, read_sweeps, summary_json
    from icl_cli.core.identity import model_info, tasks_digest
    from icl_cli.core.layers import parse_layers
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.store import StepSpec
    from icl_cli.store.sharded import run_sharded

    store = env.store
    model, tasks_dir = req.model, req.tasks_dir
    p = CollectParams(tasks=req.tasks, layers=req.layers, n_shot=req.n_shot, n_prompts=req.n_prompts, n_eval=req.n_eval,
                      template=req.template, n_first=req.n_first, seed=env.seed)
    task_list = resolve_tasks(req.tasks, tasks_dir)
    sae_arts = [store.resolve(ref) for ref in req.saes]
    # the key comes from the model's config and files, and the device from the machine: an
    # existing artifact is reused without loading the model or importing torch
    fingerprint, n_layers, _ = model_info(model, env.trust_remote_code)
    lm = None if fingerprint else env.load_lm(model)
    device, dtype = env.device_dtype()
    if not fingerprint:
        from icl_cli.core.identity import model_fingerprint

        fingerprint = model_fingerprint(lm.model)
    params = {**p.__dict__, "layers": parse_layers(req.layers, n_layers), "model": model,
              "tasks_dir": str(tasks_dir.resolve()) if tasks_dir else None,
              "model_fingerprint": fingerprint,
              "tasks_digest": tasks_digest(task_list), "task_names": [t.name for t in task_list],
              "dtype": dtype, "device": device}
    spec = StepSpec("collect", params, {f"sae{i}": a for i, a in enumerate(sae_arts)}, FORMAT_VERSION)
    names = [t.name for t in task_list]
    by_name = {t.name: t for t in task_list}
    holder = {}

    def compute(st, subset):
        from icl_cli.collect import vectors
        from icl_cli.dictionaries.io import load_dictionary

        lm_ = lm or env.load_lm(model)
        sae_objs = [(a.key, load_dictionary(a).to(lm_.device)) for a in sae_arts]
        with env.progress(len(subset), "collect") as advance:
            layer_list, results = vectors.run_collect(lm_, [by_name[t] for t in subset], p, sae_objs, progress=advance,
                                                      work_dir=st.work_dir)
        with st.h5("collect.h5") as f:
            vectors.write_h5(f, layer_list, results)
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

    rep = run_sharded(store, spec, names, compute, merge, shard=req.shard, name=req.name, force=req.force, say=env.log)
    if rep.result is None:
        return CollectOutcome(part=rep.part)
    res = rep.result
    env.saved(res)
    if "data" not in holder or res.reused:
        holder["data"] = read_sweeps(res.artifact.file("collect.h5"))
    layer_list, results = holder["data"]
    return CollectOutcome(result=res, data=summary_json(res.artifact.key, layer_list, results))


@dataclass
class TopRequest:
    """The options of one top-activations run (defaults: those of ``icl collect top-activations``)."""

    sae: str
    """SAE reference (artifact, folder or release id)."""
    features: Sequence[int]
    """Feature ids."""
    model: Optional[str] = None
    """Model (default: the one the SAE was trained on)."""
    dataset: str = "tasks"
    """tasks (toy corpus), local .txt/.jsonl files, or an HF dataset."""
    tokens: int = 20000
    """Tokens to scan."""
    ctx_len: int = 64
    """Chunk length in tokens."""
    n_top: int = 10
    """Contexts kept per feature."""
    name: Optional[str] = None
    """Name the artifact."""
    force: bool = False
    """Recompute even if the artifact exists."""


@dataclass
class TopOutcome:
    result: Any
    """StepResult of the top-activations artifact."""
    contexts: dict
    """feature id -> its top contexts (collect/top_activations.py:contexts)."""
    data: dict
    """What ``icl collect top-activations --json`` prints: key and contexts by feature."""


def run_top_activations(env: RunEnv, req: TopRequest) -> TopOutcome:
    """Store the top-activating contexts of ``req.features``, with the firing token marked."""
    from icl_cli.collect.top_activations import FORMAT_VERSION, TopParams, contexts, read_h5, top_activations, write_h5
    from icl_cli.core.identity import model_fingerprint
    from icl_cli.dictionaries.io import load_dictionary
    from icl_cli.store import StepSpec

    store = env.store
    feats, tokens, n_top, ctx_len, sae = tuple(req.features), req.tokens, req.n_top, req.ctx_len, req.sae
    if not feats or tokens < 1 or n_top < 1 or ctx_len < 2:
        raise IclError("need at least one feature, --tokens ≥ 1, --n-top ≥ 1 and --ctx ≥ 2")
    art = store.find(sae)
    d = load_dictionary(art if art is not None else sae, store)
    model = req.model or d.cfg.model or "toy-icl"
    p = TopParams(feats, req.dataset, tokens, ctx_len, n_top, env.seed)
    lm = env.load_lm(model)
    d = d.to(lm.device)
    params = {**p.__dict__, "model": model, "model_fingerprint": model_fingerprint(lm.model),
              "sae": None if art is not None else sae}
    spec = StepSpec("top-activations", params, {"sae": art}, FORMAT_VERSION)

    def build(st):
        r = top_activations(lm, d, p)
        with st.h5("top_activations.h5") as f:
            write_h5(f, p, r)
        return None

    res = store.run(spec, build, name=req.name, force=req.force, log=env.log)
    env.saved(res)
    fs, r = read_h5(res.artifact.file("top_activations.h5"))
    ctxs = contexts(lm.tokenizer, fs, r)
    data = {"key": res.artifact.key, "features": {str(f): rows for f, rows in ctxs.items()}}
    return TopOutcome(res, ctxs, data)
