"""Faithfulness of circuits (SPEC §7), reached through ``icl ablate --circuit``.

    icl ablate --circuit CIRCUIT_REF --max-nodes 2000
    icl ablate --circuit REF_A,REF_B,REF_C --cross-task          # ablate circuit A, measure task B
    icl ablate --circuit REF_A --cross-task --tasks antonyms,en_es

For each circuit: F against n for "keep the top n nodes" and "ablate the top n nodes" (n on a
log grid up to --max-nodes). With --cross-task: F on task B's prompts with circuit A's selected
feature nodes ablated, for every circuit A and task B (low F: A's circuit matters for B).
"""

from __future__ import annotations

import typer

from icl_cli.cli.common import load_lm, saved
from icl_cli.cli.context import emit, g, log
from icl_cli.core.errors import IclError

FORMAT_VERSION = 1


def curve_grid(n_max: int) -> list[int]:
    """0, 1, 2, 5, 10, 20, 50, ... up to and including n_max."""
    out, base = [0], 1
    while base <= n_max:
        out += [n for n in (base, 2 * base, 5 * base) if n <= n_max]
        base *= 10
    return sorted({*out, n_max})


def faithfulness_cmd(ctx: typer.Context, circuit: str, tasks: str | None, cross_task: bool, max_nodes: int,
                     name: str | None, force: bool) -> None:
    """Curves (and the cross-task matrix) for the circuit artifacts in ``circuit`` (comma-separated)."""
    from icl_cli.circuit.graph import read_h5
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.store import StepSpec

    gl = g(ctx)
    store = gl.store()
    arts = [store.resolve(r.strip(), step="circuit") for r in circuit.split(",") if r.strip()]
    if not arts:
        raise IclError("--circuit needs at least one circuit artifact")
    if max_nodes < 1:
        raise IclError("--max-nodes must be ≥ 1")
    first = arts[0]
    same = ("model", "layers", "model_fingerprint")
    for a in arts[1:]:
        if any(a.params.get(k) != first.params.get(k) for k in same) or \
                {k: v for k, v in a.inputs.items() if k != "suite"} != {k: v for k, v in first.inputs.items() if k != "suite"}:
            raise IclError(f"circuits {first.key[:12]} and {a.key[:12]} use different models, layers or dictionaries; "
                           "compare circuits built with the same --model, --saes and --layers")
    measure = [t.name for t in resolve_tasks(tasks)] if tasks else list(dict.fromkeys(a.params["task"] for a in arts))
    params = {"circuits": [a.key for a in arts], "tasks": measure, "cross_task": cross_task, "max_nodes": max_nodes}
    spec = StepSpec("faithfulness", params, {f"circuit{i}": a.key for i, a in enumerate(arts)}, FORMAT_VERSION)
    holder = {}

    def build(st):
        data = _compute(gl, store, arts, [read_h5(a.file("circuit.h5")) for a in arts], measure, cross_task, max_nodes)
        st.write_json("faithfulness.json", data)
        holder["data"] = data
        return {"n_circuits": len(arts)}

    res = store.run(spec, build, name=name, force=force, log=lambda m: log(m, ctx_globals=gl))
    saved(gl, res)
    import json

    data = holder.get("data") or json.loads(res.artifact.file("faithfulness.json").read_text())
    data = {"key": res.artifact.key, **data}
    emit(gl, data, table=lambda: _tables(data), keys=[res.artifact.key])


def _compute(gl, store, arts, graphs, measure: list[str], cross_task: bool, max_nodes: int) -> dict:
    from icl_cli.circuit.compute import CircuitParams, context_length, prompt_batch
    from icl_cli.circuit.dicts import dicts_from_inputs
    from icl_cli.circuit.faithfulness import curves, ranking_from_graph, reference, site_acts, ablated_metric
    from icl_cli.circuit.splice import Baseline, Groups
    from icl_cli.core.sites import HookedModel
    from icl_cli.core.tasks import resolve_tasks

    p0 = arts[0].params
    lm = load_lm(gl, p0["model"])
    hm = HookedModel(lm.model)
    dicts = {k: d.to(lm.device).requires_grad_(False) for k, d in dicts_from_inputs(store, arts[0].inputs, p0["layers"]).items()}

    def setting(task_name: str, params: dict):
        """(groups, baseline, batch, Faith) of a task's prompts under a circuit's settings."""
        cp = CircuitParams(n_prompts=params["n_prompts"], n_shot=params["n_shot"], baseline=params["baseline"],
                           per_position=params["per_position"], template=params["template"], seed=params["seed"])
        task = resolve_tasks(task_name)[0]
        _, batch = prompt_batch(lm.tokenizer, task, cp, context_length(lm.model.config), lm.device)
        groups = Groups.of(batch, cp.per_position)
        base = Baseline.of(cp.baseline, groups, site_acts(hm, batch, dicts))
        return groups, base, batch

    out = {"curves": {}}
    for art, graph in zip(arts, graphs):
        log(f"faithfulness curves of circuit {art.key[:12]} ({art.params['task']})", ctx_globals=gl)
        groups, base, batch = setting(art.params["task"], art.params)
        r = ranking_from_graph(graph, dicts, groups)
        ns = curve_grid(min(max_nodes, len(r)))
        faith, keep, drop = curves(hm, batch, dicts, groups, base, r, ns)
        out["curves"][art.key] = {"task": art.params["task"], "n": ns, "keep": keep.tolist(), "ablate": drop.tolist(),
                                  "n_selected": int((graph.selected & (graph.feature >= 0)).sum()),
                                  "m_full": faith.m_full, "m_empty": faith.m_empty}
    if cross_task:
        matrix = []
        for art, graph in zip(arts, graphs):
            row = []
            for t in measure:
                log(f"ablating circuit {art.key[:12]} on {t}", ctx_globals=gl)
                groups, base, batch = setting(t, art.params)
                circ = ranking_from_graph(graph, dicts, groups, only_selected=True)
                full = ranking_from_graph(graph, dicts, groups)
                faith = reference(hm, batch, dicts, groups, base, full)
                m = ablated_metric(hm, batch, dicts, groups, base, circ.mask(len(circ), keep=False, device=lm.device))
                row.append(faith(m))
            matrix.append(row)
        out["cross_task"] = {"rows": [a.params["task"] for a in arts], "circuits": [a.key for a in arts],
                             "cols": measure, "matrix": matrix}
    return out


def _tables(data: dict):
    from rich.table import Table

    tabs = []
    for key, c in data["curves"].items():
        t = Table(title=f"faithfulness of circuit {key[:12]} ({c['task']}); {c['n_selected']} selected feature nodes")
        for col in ("top n nodes", "F keeping them", "F ablating them"):
            t.add_column(col, justify="right")
        for n, k, a in zip(c["n"], c["keep"], c["ablate"]):
            t.add_row(str(n), f"{k:.3f}", f"{a:.3f}")
        t.caption = f"m(all kept) {c['m_full']:.3f}, m(all ablated) {c['m_empty']:.3f}; F = (m − m(∅))/(m(M) − m(∅))"
        tabs.append(t)
    if "cross_task" in data:
        x = data["cross_task"]
        t = Table(title="cross-task: F on the column task with the row task's circuit ablated")
        t.add_column("circuit of")
        for col in x["cols"]:
            t.add_column(col, justify="right")
        for name, row in zip(x["rows"], x["matrix"]):
            t.add_row(name, *(f"{v:.2f}" for v in row))
        tabs.append(t)
    return tabs
