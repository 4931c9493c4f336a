"""``icl circuit``: a sparse feature circuit of one ICL task (SPEC §7).

    icl circuit --task antonyms --saes toy-icl-suite
    icl circuit --model gemma-2-2b --task en_es --saes gemma-scope-suite --layers 8-16 --estimate
    icl circuit --task antonyms --saes toy-icl-suite --saes resid:3=my-sae --method ig --json
    icl circuit --task all --saes toy-icl-suite --shard 0/4 -q    # SLURM array job 0 of 4
    icl circuit --task all --saes toy-icl-suite -q                # afterwards: every key, computing only what is missing
    icl circuit serve pipeline-circuit-antonyms KEY2              # the graphs in a browser, on 127.0.0.1:8700 only

Several tasks (a comma list or ``all``) give one circuit artifact per task. ``--shard i/n`` (or
torchrun's RANK/WORLD_SIZE) computes the circuits of tasks[i::n] only; under torchrun rank 0 then
waits for the other ranks' circuits and prints every key.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from icl_cli.cli.common import load_lm, saved
from icl_cli.cli.context import emit, g, log
from icl_cli.cli.shard_cli import CIRCUIT_SHARD_HELP
from icl_cli.core.errors import IclError

FORMAT_VERSION = 1


app = typer.Typer(help="Sparse feature circuits of ICL tasks; `circuit serve` shows their graphs in a browser.",
                  invoke_without_command=True)


@app.callback(invoke_without_command=True)
def circuit_cmd(
    ctx: typer.Context,
    model: str = typer.Option("toy-icl", "--model", help="Model: preset, HF id or folder."),
    task: Optional[str] = typer.Option(None, "--task", help="The task (a built-in name or a JSON file); several (comma list or all): one circuit each."),
    saes: List[str] = typer.Option([], "--saes", help="A dictionary suite, and/or KIND:LAYER=REF overrides (repeat)."),
    layers: str = typer.Option("all", "--layers", help="Layers of the circuit: all, 5, 2-7, 1,3,5."),
    n_prompts: int = typer.Option(8, "--n-prompts", help="Few-shot prompts the effects are summed over."),
    n_shot: int = typer.Option(16, "--n-shot", help="Examples per prompt."),
    method: str = typer.Option("atp", "--method", help="atp (attribution patching) | ig (integrated gradients)."),
    ig_steps: int = typer.Option(10, "--ig-steps", help="Integrated-gradient steps."),
    baseline: str = typer.Option("zero", "--baseline", help="zero | mean (mean over each role's tokens)."),
    per_position: bool = typer.Option(False, "--per-position", help="One node per token position instead of per role."),
    single_token: bool = typer.Option(False, "--single-token", help="Only pairs whose input and output are one token each (the paper's circuits)."),
    prompt_positions: bool = typer.Option(False, "--prompt-positions", help="One prompt node per instruction token instead of one for the instruction."),
    target: float = typer.Option(0.95, "--target", help="Faithfulness the selected circuit must reach."),
    edge_nodes: int = typer.Option(1000, "--edge-nodes", help="Edges join at most this many selected feature nodes."),
    edge_rows: int = typer.Option(256, "--edge-rows", help="Rows of one batched pass (edges, IG); lower it to save memory."),
    template: str = typer.Option("paper", "--template", help="Prompt template: paper | hendel | todd."),
    estimate: bool = typer.Option(False, "--estimate", help="Only print the memory and time the circuit needs."),
    top: int = typer.Option(3, "--top", help="Nodes shown per layer and role in the table."),
    shard: Optional[str] = typer.Option(None, "--shard", help=CIRCUIT_SHARD_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Name the artifact."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the artifact exists; run even when the estimate exceeds free memory."),
) -> None:
    """Node effects, the smallest faithful circuit and its edges, for one task (or one circuit per task of several)."""
    if ctx.invoked_subcommand is not None:
        return
    if task is None or not saes:
        raise typer.BadParameter("pass --task and --saes (or a subcommand: serve)",
                                 param_hint="'--task' / '--saes'")
    from icl_cli.circuit.compute import CircuitParams
    from icl_cli.circuit.dicts import resolve_dicts
    from icl_cli.core.identity import model_info
    from icl_cli.core.layers import parse_layers
    from icl_cli.core.models import resolve_device, resolve_dtype
    from icl_cli.core.tasks import resolve_tasks

    gl = g(ctx)
    store = gl.store()
    p = CircuitParams(n_prompts=n_prompts, n_shot=n_shot, method=method, ig_steps=ig_steps, baseline=baseline,
                      per_position=per_position, target=target, edge_nodes=edge_nodes, template=template, seed=gl.seed,
                      single_token=single_token, prompt_positions=prompt_positions)
    if edge_rows < 1:
        raise IclError("--edge-rows must be ≥ 1")
    tasks = resolve_tasks(task)
    from icl_cli.store import shards as sharding

    part, torchrun = sharding.resolve(shard)
    fingerprint, n_layers, d_model = model_info(model, gl.trust_remote_code)
    chosen = parse_layers(layers, n_layers)
    dicts, inputs = resolve_dicts(store, saes, chosen, model, d_model, fingerprint)
    device = resolve_device(gl.device)
    dtype = resolve_dtype(gl.dtype, device)
    if len(tasks) == 1 and part is None:  # one task: one circuit, as always
        if estimate:
            est = _estimate(gl, model, tasks[0], dicts, p, edge_rows, device, dtype, measure=True)
            data = {"model": model, "task": tasks[0].name, "layers": chosen, **est.to_json()}
            emit(gl, data, table=lambda: _estimate_table(data))
            return
        res, graph = _circuit(gl, store, model, tasks[0], dicts, inputs, p, edge_rows, chosen, device, dtype, fingerprint,
                              name, force)
        data = summary(res.artifact.key, graph)
        emit(gl, data, table=lambda: _tables(data, graph, top), keys=[res.artifact.key])
        return
    if estimate:
        raise IclError("--estimate is for one --task; run it per task")
    if name is not None:
        raise IclError("--name names one artifact; leave it out with several tasks (or name each circuit with `icl store tag`)")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise IclError(f"--task lists a task twice ({task}); give each task once")
    mine = names
    if part is not None:
        sharding.check_count(part, names)
        mine = part.tasks(names)
        log(f"shard {part}: circuits of {len(mine)} of {len(names)} tasks ({', '.join(mine)})", ctx_globals=gl)
    by_name = {t.name: t for t in tasks}
    done = {}
    for t in mine:
        res, _ = _circuit(gl, store, model, by_name[t], dicts, inputs, p, edge_rows, chosen, device, dtype, fingerprint,
                          None, force, graph=False)
        done[t] = res
    reused = sum(r.reused for r in done.values())
    log(f"circuits of {len(done)} task(s): {reused} reused, {len(done) - reused} computed", ctx_globals=gl)
    if part is not None and torchrun and part.index != 0:
        return  # under torchrun only rank 0 prints
    show = mine
    if part is not None and torchrun:  # rank 0: wait for the other ranks' circuits, then print them all
        keys = {t: store.bind(_spec(model, by_name[t], p, inputs, chosen, dtype, fingerprint)).key for t in names}
        _wait(store, keys, lambda m: log(m, ctx_globals=gl))
        show = names
    arts = {t: (done[t].artifact if t in done else store.get(keys[t])) for t in show}
    from icl_cli.circuit.graph import read_h5

    rows = {t: {"task": t, **summary(a.key, read_h5(a.file("circuit.h5")), n_top=5)} for t, a in arts.items()}
    data = {"circuits": list(rows.values()), "shard": str(part) if part is not None and not torchrun else None}
    emit(gl, data, table=lambda: _many_table(data), keys=[a.key for a in arts.values()])


def _spec(model, task, p, inputs, chosen, dtype, fingerprint):
    """The circuit step's spec for one task."""
    from icl_cli.core.identity import tasks_digest
    from icl_cli.store import StepSpec

    params = {**p.__dict__, "model": model, "task": task.name, "tasks_digest": tasks_digest([task]),
              "layers": chosen, "dtype": str(dtype), "model_fingerprint": fingerprint}
    return StepSpec("circuit", params, inputs, FORMAT_VERSION)


def _circuit(gl, store, model, task, dicts, inputs, p, edge_rows, chosen, device, dtype, fingerprint, name, force,
             graph: bool = True):
    """(StepResult, CircuitGraph or None) of one task's circuit: reused, or checked against free memory and computed."""
    spec = _spec(model, task, p, inputs, chosen, dtype, fingerprint)
    if graph or force or store.lookup(spec) is None:  # one task: checked as before, even when reused
        est = _estimate(gl, model, task, dicts, p, edge_rows, device, dtype, measure=False)
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

        lm = load_lm(gl, model)
        dd = {k: d.to(lm.device).requires_grad_(False) for k, d in dicts.items()}
        say = lambda m: log(m, ctx_globals=gl)  # noqa: E731
        g_ = compute_circuit(HookedModel(lm.model), lm.tokenizer, task, dd, p, model, edge_rows, say)
        with st.h5("circuit.h5") as f:
            write_h5(f, g_)
        write_exports(st.dir / "exports", g_)
        holder["graph"] = g_
        return {"n_nodes": int(g_.selected.sum()), "n_edges": g_.n_edges,
                "faithfulness": g_.attrs["faithfulness"], "threshold": g_.attrs["threshold"]}

    res = store.run(spec, build, name=name, force=force, log=lambda m: log(m, ctx_globals=gl))
    saved(gl, res)
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


def _many_table(data: dict):
    from rich.table import Table

    t = Table(title="circuits, one per task" + (f" (shard {data['shard']})" if data.get("shard") else ""))
    for c in ("task", "circuit", "nodes", "features", "edges", "faithfulness"):
        t.add_column(c, justify="left" if c in ("task", "circuit") else "right")
    for r in data["circuits"]:
        t.add_row(r["task"], r["key"][:12], str(r["n_nodes"]), str(r["n_feature_nodes"]), str(r["n_edges"]),
                  f"{r['faithfulness']:.3f}")
    return t


def _estimate(gl, model, task, dicts, p, edge_rows, device, dtype, measure: bool):
    """The memory and time estimate, from the config, the tokenizer and the dictionaries only."""
    import torch

    from icl_cli.circuit.compute import context_length, prompt_batch
    from icl_cli.circuit.estimate import Shapes, estimate, free_memory, measure_throughput
    from icl_cli.core.models import load_config, load_tokenizer

    config = load_config(model, gl.trust_remote_code)
    tok = load_tokenizer(model, gl.trust_remote_code)
    _, batch = prompt_batch(tok, task, p, context_length(config))
    shapes = Shapes.of(config, dicts, torch.tensor([], dtype=dtype).element_size())
    tput = measure_throughput(device) if measure else None
    return estimate(shapes, len(batch), batch.input_ids.shape[1], p.method, p.ig_steps, edge_rows, p.edge_nodes,
                    throughput=tput, free=free_memory(device))


def summary(key: str, graph, n_top: int = 20) -> dict:
    """The --json document of the issue."""
    import numpy as np

    sel = np.flatnonzero(graph.selected)
    order = sel[np.argsort(-np.abs(graph.ie[sel]), kind="stable")][:n_top]
    return {"key": key, "n_nodes": int(len(sel)), "n_edges": graph.n_edges,
            "threshold": graph.attrs.get("threshold"), "faithfulness": graph.attrs.get("faithfulness"),
            "n_feature_nodes": int((graph.feature[sel] >= 0).sum()),
            "top_nodes": [{"site": str(graph.site[i]), "layer": int(graph.layer[i]), "role": str(graph.role[i]),
                           "feature": int(graph.feature[i]), "ie": float(graph.ie[i])} for i in order]}


def _node(graph, i: int) -> str:
    from rich.markup import escape

    f = int(graph.feature[i])
    return escape(f"{graph.site[i]}.{graph.layer[i]}[{graph.role[i]}]:{'err' if f < 0 else f}")


def _tables(data: dict, graph, top: int):
    import numpy as np
    from rich.table import Table

    a = graph.attrs
    t1 = Table(title=f"circuit of {', '.join(a.get('tasks', []))} on {a.get('model')} ({a.get('method')}, "
                     f"{a.get('baseline')} baseline); circuit {data['key'][:12]}")
    t1.add_column("layer", justify="right")
    roles = list(dict.fromkeys(str(r) for r in graph.role[graph.selected]))
    for r in roles:
        t1.add_column(r)
    sel = graph.selected & (graph.feature >= 0)
    for l in sorted(set(int(x) for x in graph.layer[sel])):
        cells = []
        for r in roles:
            idx = np.flatnonzero(sel & (graph.layer == l) & (graph.role == r))
            idx = idx[np.argsort(-np.abs(graph.ie[idx]))][:top]
            cells.append(", ".join(f"{graph.site[i][0]}{graph.feature[i]} {graph.ie[i]:+.3f}" for i in idx))
        t1.add_row(str(l), *cells)
    t1.caption = (f"{data['n_nodes']} nodes ({data['n_feature_nodes']} features) at |IE| ≥ {data['threshold']:.2e}: "
                  f"faithfulness {data['faithfulness']:.3f}; {data['n_edges']} edges. "
                  "Cells: r/a/t = resid/attn/transcoder feature, IE.")
    t2 = Table(title="strongest edges")
    for c in ("from", "to", "weight"):
        t2.add_column(c, justify="right" if c == "weight" else "left")
    for e in np.argsort(-np.abs(graph.edge_weight))[:10]:
        t2.add_row(_node(graph, int(graph.edge_src[e])), _node(graph, int(graph.edge_dst[e])), f"{graph.edge_weight[e]:+.4f}")
    return [t1, t2]


def _estimate_table(data: dict):
    from rich.table import Table

    t = Table(title=f"circuit estimate: {data['model']}, task {data['task']}, layers {data['layers'][0]}-{data['layers'][-1]}")
    t.add_column("phase")
    t.add_column("working memory GiB", justify="right")
    for k, v in data["phases_gib"].items():
        t.add_row(k + (" (peak)" if k == data["phase"] else ""), f"{v:.3f}")
    free = "unknown" if data["free_gib"] is None else f"{data['free_gib']:.1f}"
    t.caption = (f"weights {data['resident_gib']:.3f} GiB + peak {data['peak_gib']:.3f} GiB = {data['total_gib']:.3f} GiB "
                 f"(free {free}: {'fits' if data['fits'] else 'does NOT fit'}); about {data['seconds']:.0f} s "
                 f"({data['tflops']:.2f} TFLOP)")
    return t


@app.command("serve")
def serve_cmd(
    ctx: typer.Context,
    refs: List[str] = typer.Argument(..., help="Circuit artifacts (key, key prefix or name), circuit.h5 files or exported graph.json files."),
    port: int = typer.Option(8700, "--port", help="Port on 127.0.0.1 (0: any free port)."),
    node_threshold: float = typer.Option(0.8, "--node-threshold", help="Keep the nodes holding this share of the influence on the metric (circuit-tracer's pruning)."),
    edge_threshold: float = typer.Option(0.98, "--edge-threshold", help="Keep the edges holding this share of the influence."),
) -> None:
    """Show circuit graphs in a browser: a local viewer on 127.0.0.1, fully offline; Ctrl-C stops it."""
    from icl_cli.circuit.viewer.serve import load_graphs, make_server

    gl = g(ctx)
    docs = load_graphs(gl.store(), refs, node_threshold, edge_threshold)
    server = make_server(docs, port)
    log(f"serving {len(docs)} graph(s) on {server.url} (this machine only); Ctrl-C stops", ctx_globals=gl)
    data = {"url": server.url, "graphs": [d["metadata"]["slug"] for d in docs]}
    emit(gl, data, table=lambda: server.url, keys=[server.url])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
