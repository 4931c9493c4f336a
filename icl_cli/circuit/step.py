"""The circuit step as one call (``icl circuit``, ``icl pipeline``): one circuit artifact per task,
each checked against free memory before it is computed.

    out = run_circuit(env, CircuitRequest(task="antonyms", saes=["toy-icl-suite"], layers="2-4"))
    out.result.artifact.key, out.graph, out.data                   # one task
    out = run_circuit(env, CircuitRequest(task="all", saes=["toy-icl-suite"], shard="0/4"))
    out.data["circuits"]                                           # several: a row per circuit
    est = estimate_circuit(env, CircuitRequest(task="en_es", saes=["toy-icl-suite"]))

``shard`` (or torchrun's RANK/WORLD_SIZE) computes the circuits of tasks[i::n] only; under torchrun
rank 0 then waits for the other ranks' circuits and reports every one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from icl_cli.core.errors import IclError
from icl_cli.core.runenv import RunEnv

FORMAT_VERSION = 2
"""2: a prompt's first token is never a node (the attention sink of models without BOS)."""


@dataclass
class CircuitRequest:
    """The options of one circuit run (defaults: those of ``icl circuit``)."""

    task: str
    """The task (a built-in name or a JSON file); several (comma list or all): one circuit each."""
    saes: List[str] = field(default_factory=list)
    """A dictionary suite, and/or KIND:LAYER=REF overrides."""
    model: str = "toy-icl"
    """Model: preset, HF id or folder."""
    layers: str = "all"
    """Layers of the circuit: all, 5, 2-7, 1,3,5."""
    n_prompts: int = 8
    """Few-shot prompts the effects are summed over."""
    n_shot: int = 16
    """Examples per prompt."""
    method: str = "atp"
    """atp (attribution patching) | ig (integrated gradients)."""
    ig_steps: int = 10
    """Integrated-gradient steps."""
    baseline: str = "zero"
    """zero | mean (mean over each role's tokens)."""
    per_position: bool = False
    """One node per token position instead of per role."""
    single_token: bool = False
    """Only pairs whose input and output are one token each (the paper's circuits)."""
    prompt_positions: bool = False
    """One prompt node per instruction token instead of one for the instruction."""
    target: float = 0.95
    """Faithfulness the selected circuit must reach."""
    edge_nodes: int = 1000
    """Edges join at most this many selected feature nodes."""
    edge_rows: int = 256
    """Rows of one batched pass (edges, IG)."""
    template: str = "paper"
    """Prompt template: paper | hendel | todd."""
    shard: Optional[str] = None
    """i/n: compute only the circuits of shard i of n of the tasks."""
    name: Optional[str] = None
    """Name the artifact (one task only)."""
    force: bool = False
    """Recompute even if the artifact exists; run even when the estimate exceeds free memory."""


@dataclass
class CircuitOutcome:
    """One task: its circuit (result, graph, data = ``summary``). Several: ``data`` holds a row per
    circuit and ``keys`` their keys. Nothing (all None) on a torchrun rank other than 0."""

    result: Any = None
    """StepResult of the one task's circuit."""
    graph: Any = None
    """Its CircuitGraph (circuit/graph.py)."""
    data: dict | None = None
    """What ``icl circuit --json`` prints."""
    keys: list[str] = field(default_factory=list)
    """The circuits' keys, in task order."""


@dataclass
class _Prepared:
    p: Any
    tasks: list
    part: Any
    torchrun: bool
    fingerprint: str | None
    chosen: list[int]
    dicts: dict
    inputs: dict
    device: Any
    dtype: Any


def _prepare(env: RunEnv, req: CircuitRequest) -> _Prepared:
    from icl_cli.circuit.compute import CircuitParams
    from icl_cli.circuit.dicts import resolve_dicts
    from icl_cli.core.identity import model_info
    from icl_cli.core.layers import parse_layers
    from icl_cli.core.models import resolve_device, resolve_dtype
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.store import shards as sharding

    p = CircuitParams(n_prompts=req.n_prompts, n_shot=req.n_shot, method=req.method, ig_steps=req.ig_steps,
                      baseline=req.baseline, per_position=req.per_position, target=req.target, edge_nodes=req.edge_nodes,
                      template=req.template, seed=env.seed, single_token=req.single_token,
                      prompt_positions=req.prompt_positions)
    if req.edge_rows < 1:
        raise IclError("--edge-rows must be ≥ 1")
    tasks = resolve_tasks(req.task)
    part, torchrun = sharding.resolve(req.shard)
    fingerprint, n_layers, d_model = model_info(req.model, env.trust_remote_code)
    chosen = parse_layers(req.layers, n_layers)
    dicts, inputs = resolve_dicts(env.store, req.saes, chosen, req.model, d_model, fingerprint)
    device = resolve_device(env.device)
    dtype = resolve_dtype(env.dtype, device)
    return _Prepared(p, tasks, part, torchrun, fingerprint, chosen, dicts, inputs, device, dtype)


def estimate_circuit(env: RunEnv, req: CircuitRequest) -> dict:
    """The memory and time one task's circuit needs (from the config, the tokenizer and the
    dictionaries; a short throughput measurement): model, task, layers and the Estimate's JSON."""
    s = _prepare(env, req)
    if len(s.tasks) != 1 or s.part is not None:
        raise IclError("--estimate is for one --task; run it per task")
    est = _estimate(env, req.model, s.tasks[0], s.dicts, s.p, req.edge_rows, s.device, s.dtype, measure=True)
    return {"model": req.model, "task": s.tasks[0].name, "layers": s.chosen, **est.to_json()}


def run_circuit(env: RunEnv, req: CircuitRequest) -> CircuitOutcome:
    """Node effects, the smallest faithful circuit and its edges, for one task (or one circuit per task of several)."""
    from icl_cli.store import shards as sharding

    store = env.store
    s = _prepare(env, req)
    p, tasks, part, torchrun, fingerprint, chosen, dicts, inputs, device, dtype = (
        s.p, s.tasks, s.part, s.torchrun, s.fingerprint, s.chosen, s.dicts, s.inputs, s.device, s.dtype)
    model, edge_rows, force = req.model, req.edge_rows, req.force
    if len(tasks) == 1 and part is None:  # one task: one circuit, as always
        res, graph = _circuit(env, model, tasks[0], dicts, inputs, p, edge_rows, chosen, device, dtype, fingerprint,
                              req.name, force)
        return CircuitOutcome(res, graph, summary(res.artifact.key, graph), [res.artifact.key])
    if req.name is not None:
        raise IclError("--name names one artifact; leave it out with several tasks (or name each circuit with `icl store tag`)")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise IclError(f"--task lists a task twice ({req.task}); give each task once")
    mine = names
    if part is not None:
        sharding.check_count(part, names)
        mine = part.tasks(names)
        env.log(f"shard {part}: circuits of {len(mine)} of {len(names)} tasks ({', '.join(mine)})")
    by_name = {t.name: t for t in tasks}
    done = {}
    for t in mine:
        res, _ = _circuit(env, model, by_name[t], dicts, inputs, p, edge_rows, chosen, device, dtype, fingerprint,
                          None, force, graph=False)
        done[t] = res
    reused = sum(r.reused for r in done.values())
    env.log(f"circuits of {len(done)} task(s): {reused} reused, {len(done) - reused} computed")
    if part is not None and torchrun and part.index != 0:
        return CircuitOutcome()  # under torchrun only rank 0 reports
    show = mine
    if part is not None and torchrun:  # rank 0: wait for the other ranks' circuits, then report them all
        keys = {t: store.bind(_spec(model, by_name[t], p, inputs, chosen, dtype, fingerprint)).key for t in names}
        _wait(store, keys, env.log)
        show = names
    arts = {t: (done[t].artifact if t in done else store.get(keys[t])) for t in show}
    from icl_cli.circuit.graph import read_h5

    rows = {t: {"task": t, **summary(a.key, read_h5(a.file("circuit.h5")), n_top=5)} for t, a in arts.items()}
    data = {"circuits": list(rows.values()), "shard": str(part) if part is not None and not torchrun else None}
    return CircuitOutcome(data=data, keys=[a.key for a in arts.values()])


def _spec(model, task, p, inputs, chosen, dtype, fingerprint):
    """The circuit step's spec for one task."""
    from icl_cli.core.identity import tasks_digest
    from icl_cli.store import StepSpec

    params = {**p.__dict__, "model": model, "task": task.name, "tasks_digest": tasks_digest([task]),
              "layers": chosen, "dtype": str(dtype), "model_fingerprint": fingerprint}
    return StepSpec("circuit", params, inputs, FORMAT_VERSION)


def _circuit(env: RunEnv, model, task, dicts, inputs, p, edge_rows, chosen, device, dtype, fingerprint, name, force,
             graph: bool = True):
    """(StepResult, CircuitGraph or None) of one task's circuit: reused, or checked against free memory and computed."""
    store = env.store
    spec = _spec(model, task, p, inputs, chosen, dtype, fingerprint)
    if graph or force or store.lookup(spec) is None:  # one task: checked as before, even when reused
        est = _estimate(env, model, task, dicts, p, edge_rows, device, dtype, measure=False)
        if not est.fits() and not force:
            raise IclError(f"the circuit{'' if graph else ' of ' + task.name} needs about {est.total / 2**30:.1f} GiB ({est.phase} phase) but "
                           f"{est.free / 2**30:.1f} GiB are free; lower --n-prompts, --n-shot or --edge-rows, choose fewer "
                           "--layers, or pass --force")
    holder = {}

    def build(st):
        from icl_cli.circuit.compute import compute_circuit
        from icl_cli.circuit.export import write_exports
        from icl_cli.circuit.graph import write_h5
        from icl_cli.core.sites import HookedModel

        lm = env.load_lm(model)
        dd = {k: d.to(lm.device).requires_grad_(False) for k, d in dicts.items()}
        g_ = compute_circuit(HookedModel(lm.model), lm.tokenizer, task, dd, p, model, edge_rows, env.log)
        with st.h5("circuit.h5") as f:
            write_h5(f, g_)
        write_exports(st.dir / "exports", g_)
        holder["graph"] = g_
        return {"n_nodes": int(g_.selected.sum()), "n_edges": g_.n_edges,
                "faithfulness": g_.attrs["faithfulness"], "threshold": g_.attrs["threshold"]}

    res = store.run(spec, build, name=name, force=force, log=env.log)
    env.saved(res)
    if not graph:
        return res, None
    from icl_cli.circuit.graph import read_h5

    return res, holder.get("graph") or read_h5(res.artifact.file("circuit.h5"))


def _wait(store, keys: dict, say, timeout: float | None = None) -> None:
    """Poll the store until every circuit of ``keys`` (task -> key) is published (rank 0 under torchrun)."""
    from icl_cli.store.shards import poll

    poll(lambda: ", ".join(t for t, k in keys.items() if store.get(k) is None), say,
         "waiting for the circuits of {} (other ranks)",
         "the circuits of {} did not appear within {:.0f} s (ICL_SHARD_TIMEOUT); check those ranks' logs", timeout)


def _estimate(env: RunEnv, model, task, dicts, p, edge_rows, device, dtype, measure: bool):
    """The memory and time estimate, from the config, the tokenizer and the dictionaries only."""
    import torch

    from icl_cli.circuit.compute import context_length, prompt_batch
    from icl_cli.circuit.estimate import Shapes, estimate, free_memory, measure_throughput
    from icl_cli.core.models import load_config, load_tokenizer

    config = load_config(model, env.trust_remote_code)
    tok = load_tokenizer(model, env.trust_remote_code)
    _, batch = prompt_batch(tok, task, p, context_length(config))
    shapes = Shapes.of(config, dicts, torch.tensor([], dtype=dtype).element_size())
    tput = measure_throughput(device) if measure else None
    return estimate(shapes, len(batch), batch.input_ids.shape[1], p.method, p.ig_steps, edge_rows, p.edge_nodes,
                    throughput=tput, free=free_memory(device))


def summary(key: str, graph, n_top: int = 20) -> dict:
    """The --json document of one circuit: sizes, threshold, faithfulness and the top nodes by |IE|."""
    import numpy as np

    sel = np.flatnonzero(graph.selected)
    order = sel[np.argsort(-np.abs(graph.ie[sel]), kind="stable")][:n_top]
    return {"key": key, "n_nodes": int(len(sel)), "n_edges": graph.n_edges,
            "threshold": graph.attrs.get("threshold"), "faithfulness": graph.attrs.get("faithfulness"),
            "n_feature_nodes": int((graph.feature[sel] >= 0).sum()),
            "top_nodes": [{"site": str(graph.site[i]), "layer": int(graph.layer[i]), "role": str(graph.role[i]),
                           "feature": int(graph.feature[i]), "ie": float(graph.ie[i])} for i in order]}
