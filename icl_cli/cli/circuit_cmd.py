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

from icl_cli.cli.common import run_env
from icl_cli.cli.context import emit, g, log
from icl_cli.cli.shard_cli import CIRCUIT_SHARD_HELP

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
    from icl_cli.circuit.step import CircuitRequest, estimate_circuit, run_circuit

    gl = g(ctx)
    req = CircuitRequest(task=task, saes=saes, model=model, layers=layers, n_prompts=n_prompts, n_shot=n_shot, method=method,
                         ig_steps=ig_steps, baseline=baseline, per_position=per_position, single_token=single_token,
                         prompt_positions=prompt_positions, target=target, edge_nodes=edge_nodes, edge_rows=edge_rows,
                         template=template, shard=shard, name=name, force=force)
    if estimate:
        data = estimate_circuit(run_env(gl), req)
        emit(gl, data, table=lambda: _estimate_table(data))
        return
    out = run_circuit(run_env(gl), req)
    if out.graph is not None:
        emit(gl, out.data, table=lambda: _tables(out.data, out.graph, top), keys=out.keys)
    elif out.data is not None:  # several tasks (nothing on a torchrun rank other than 0)
        emit(gl, out.data, table=lambda: _many_table(out.data), keys=out.keys)


def _many_table(data: dict):
    from rich.table import Table

    t = Table(title="circuits, one per task" + (f" (shard {data['shard']})" if data.get("shard") else ""))
    for c in ("task", "circuit", "nodes", "features", "edges", "faithfulness"):
        t.add_column(c, justify="left" if c in ("task", "circuit") else "right")
    for r in data["circuits"]:
        t.add_row(r["task"], r["key"][:12], str(r["n_nodes"]), str(r["n_feature_nodes"]), str(r["n_edges"]),
                  f"{r['faithfulness']:.3f}")
    return t


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
