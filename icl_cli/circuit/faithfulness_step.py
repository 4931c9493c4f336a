"""The faithfulness step as one call (``icl ablate --circuit``, ``icl pipeline``): curves of stored
circuits on held-out prompts and, on request, the cross-task matrix, published as a
faithfulness artifact (``faithfulness.json``, evaluate.py's FaithReport.to_json()).

    out = run_faithfulness(env, FaithRequest(circuits="c-antonyms,c-en_es", cross_task=True))
    out.result.artifact.key, out.data["cross_task"]["cells"]

Checked first (one-line IclError each): at least one circuit, all built with the same model,
layers and dictionaries; a --model that is not the circuits' model; --cross-task over fewer than
two tasks; --max-nodes below 1 and the other measurement options (evaluate.FaithOptions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from icl_cli.circuit.evaluate import FaithOptions
from icl_cli.core.errors import IclError
from icl_cli.core.runenv import RunEnv

FORMAT_VERSION = 2
"""2: held-out prompts by default, signed ranking, m(M) = the unablated model, cross-task cells."""


@dataclass
class FaithRequest:
    """The options of one faithfulness run (defaults: those of ``icl ablate --circuit``)."""

    circuits: str
    """Circuit artifacts (keys or names), comma-separated."""
    tasks: str | None = None
    """Columns of the cross-task matrix (default: the circuits' tasks)."""
    options: FaithOptions | None = None
    """What to measure and on which prompts (default: FaithOptions())."""
    model: str | None = None
    """The model the caller expects; an error unless it is the circuits' model."""
    name: str | None = None
    """Name the artifact."""
    force: bool = False
    """Recompute even if the artifact exists."""


@dataclass
class FaithOutcome:
    result: Any
    """StepResult of the faithfulness artifact."""
    data: dict
    """faithfulness.json with the artifact's ``key``: what ``icl ablate --circuit --json`` prints."""


def run_faithfulness(env: RunEnv, req: FaithRequest) -> FaithOutcome:
    """Check the request, then reuse or compute the faithfulness artifact."""
    import json

    from icl_cli.core.models import same_model
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.store import StepSpec

    opts = req.options or FaithOptions()
    store = env.store
    arts = [store.resolve(r.strip(), step="circuit") for r in req.circuits.split(",") if r.strip()]
    if not arts:
        raise IclError("--circuit needs at least one circuit artifact")
    first = arts[0]
    same = ("model", "layers", "model_fingerprint")
    for a in arts[1:]:
        if any(a.params.get(k) != first.params.get(k) for k in same) or \
                {k: v for k, v in a.inputs.items() if k != "suite"} != {k: v for k, v in first.inputs.items() if k != "suite"}:
            raise IclError(f"circuits {first.key[:12]} and {a.key[:12]} use different models, layers or dictionaries; "
                           "compare circuits built with the same --model, --saes and --layers")
    model = first.params["model"]
    if req.model is not None and not same_model(req.model, model):
        raise IclError(f"circuit {first.key[:12]} was computed on {model}, so its prompts and dictionaries are that "
                       f"model's, not {req.model}'s; drop --model or pass circuits of {req.model}")
    measure = [t.name for t in resolve_tasks(req.tasks)] if req.tasks else list(dict.fromkeys(a.params["task"] for a in arts))
    if opts.cross_task and len(measure) < 2:
        raise IclError(f"--cross-task needs at least two tasks to compare, got {', '.join(measure)}; "
                       "pass circuits of several tasks or --tasks A,B")
    params = {"circuits": [a.key for a in arts], "tasks": measure, "cross_task": opts.cross_task,
              "max_nodes": opts.max_nodes, "prompts": opts.prompts, "rank": opts.rank, "n_shot": opts.n_shot,
              "n_prompts": opts.n_prompts}
    spec = StepSpec("faithfulness", params, {f"circuit{i}": a.key for i, a in enumerate(arts)}, FORMAT_VERSION)
    holder: dict = {}

    def build(st):
        data = _compute(env, store, arts, measure, opts)
        st.write_json("faithfulness.json", data)
        holder["data"] = data
        return {"n_circuits": len(arts), "prompts": opts.prompts}

    res = store.run(spec, build, name=req.name, force=req.force, log=env.log)
    env.saved(res)
    data = holder.get("data") or json.loads(res.artifact.file("faithfulness.json").read_text())
    return FaithOutcome(res, {"key": res.artifact.key, **data})


def _compute(env: RunEnv, store, arts, measure: list[str], opts: FaithOptions) -> dict:
    from icl_cli.circuit.dicts import dicts_from_inputs
    from icl_cli.circuit.evaluate import evaluate_circuits
    from icl_cli.circuit.graph import read_h5
    from icl_cli.core.sites import HookedModel
    from icl_cli.core.tasks import resolve_tasks

    p0 = arts[0].params
    lm = env.load_lm(p0["model"])
    dicts = {k: d.to(lm.device).requires_grad_(False)
             for k, d in dicts_from_inputs(store, arts[0].inputs, p0["layers"]).items()}
    circuits = [(a.key, read_h5(a.file("circuit.h5"))) for a in arts]
    rep = evaluate_circuits(HookedModel(lm.model), lm.tokenizer, dicts, circuits, resolve_tasks(",".join(measure)),
                            opts, progress=env.log)
    return rep.to_json()
