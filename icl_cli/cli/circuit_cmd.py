"""``icl circuit``: a sparse feature circuit of one ICL task (SPEC §7).

    icl circuit --task antonyms --saes toy-icl-suite
    icl circuit --model gemma-2-2b --task en_es --saes gemma-scope-suite --layers 8-16 --estimate
    icl circuit --task antonyms --saes toy-icl-suite --saes resid:3=my-sae --method ig --json
"""

from __future__ import annotations

from typing import List, Optional

import typer

from icl_cli.cli.common import load_lm, saved
from icl_cli.cli.context import emit, g, log
from icl_cli.errors import IclError

FORMAT_VERSION = 1


def register(app: typer.Typer) -> None:
    app.command("circuit")(circuit_cmd)


def circuit_cmd(
    ctx: typer.Context,
    model: str = typer.Option("toy-icl", "--model", help="Model: preset, HF id or folder."),
    task: str = typer.Option(..., "--task", help="The task (a built-in name or a JSON file)."),
    saes: List[str] = typer.Option(..., "--saes", help="A dictionary suite, and/or KIND:LAYER=REF overrides (repeat)."),
    layers: str = typer.Option("all", "--layers", help="Layers of the circuit: all, 5, 2-7, 1,3,5."),
    n_prompts: int = typer.Option(8, "--n-prompts", help="Few-shot prompts the effects are summed over."),
    n_shot: int = typer.Option(16, "--n-shot", help="Examples per prompt."),
    method: str = typer.Option("atp", "--method", help="atp (attribution patching) | ig (integrated gradients)."),
    ig_steps: int = typer.Option(10, "--ig-steps", help="Integrated-gradient steps."),
    baseline: str = typer.Option("zero", "--baseline", help="zero | mean (mean over each role's tokens)."),
    per_position: bool = typer.Option(False, "--per-position", help="One node per token position instead of per role."),
    target: float = typer.Option(0.95, "--target", help="Faithfulness the selected circuit must reach."),
    edge_nodes: int = typer.Option(1000, "--edge-nodes", help="Edges join at most this many selected feature nodes."),
    edge_rows: int = typer.Option(256, "--edge-rows", help="Rows of one batched pass (edges, IG); lower it to save memory."),
    template: str = typer.Option("paper", "--template", help="Prompt template: paper | hendel | todd."),
    estimate: bool = typer.Option(False, "--estimate", help="Only print the memory and time the circuit needs."),
    top: int = typer.Option(3, "--top", help="Nodes shown per layer and role in the table."),
    name: Optional[str] = typer.Option(None, "--name", help="Name the artifact."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the artifact exists; run even when the estimate exceeds free memory."),
) -> None:
    """Node effects, the smallest faithful circuit and its edges, for one task."""
    from icl_cli.circuit.compute import CircuitParams
    from icl_cli.circuit.dicts import resolve_dicts
    from icl_cli.core.identity import model_info, tasks_digest
    from icl_cli.core.layers import parse_layers
    from icl_cli.core.models import resolve_device, resolve_dtype
    from icl_cli.core.tasks import resolve_tasks
    from icl_cli.store import StepSpec

    gl = g(ctx)
    store = gl.store()
    p = CircuitParams(n_prompts=n_prompts, n_shot=n_shot, method=method, ig_steps=ig_steps, baseline=baseline,
                      per_position=per_position, target=target, edge_nodes=edge_nodes, template=template, seed=gl.seed)
    if edge_rows < 1:
        raise IclError("--edge-rows must be ≥ 1")
    tasks = resolve_tasks(task)
    if len(tasks) != 1:
        raise IclError("a circuit is for one task; pass one --task (the cross-task matrix is `icl ablate --circuit`)")
    fingerprint, n_layers, d_model = model_info(model, gl.trust_remote_code)
    chosen = parse_layers(layers, n_layers)
    dicts, inputs = resolve_dicts(store, saes, chosen, model, d_model, fingerprint)
    device = resolve_device(gl.device)
    dtype = resolve_dtype(gl.dtype, device)
    est = _estimate(gl, model, tasks[0], dicts, p, edge_rows, device, dtype, measure=estimate)
    if estimate:
        data = {"model": model, "task": tasks[0].name, "layers": chosen, **est.to_json()}
        emit(gl, data, table=lambda: _estimate_table(data))
        return
    if not est.fits() and not force:
        raise IclError(f"the circuit needs about {est.total / 2**30:.1f} GiB ({est.phase} phase) but {est.free / 2**30:.1f} GiB "
                       f"are free; lower --n-prompts, --n-shot or --edge-rows, choose fewer --layers, or pass --force")
    params = {**p.__dict__, "model": model, "task": tasks[0].name, "tasks_digest": tasks_digest(tasks),
              "layers": chosen, "dtype": str(dtype), "model_fingerprint": fingerprint}
    spec = StepSpec("circuit", params, inputs, FORMAT_VERSION)
    holder = {}

    def build(st):
        from icl_cli.circuit.compute import compute_circuit
        from icl_cli.circuit.export import write_exports
        from icl_cli.circuit.graph import write_h5
        from icl_cli.core.sites import HookedModel

        lm = load_lm(gl, model)
        dd = {k: d.to(lm.device).requires_grad_(False) for k, d in dicts.items()}
        say = lambda m: log(m, ctx_globals=gl)  # noqa: E731
        graph = compute_circuit(HookedModel(lm.model), lm.tokenizer, tasks[0], dd, p, model, edge_rows, say)
        with st.h5("circuit.h5") as f:
            write_h5(f, graph)
        write_exports(st.dir / "exports", graph)
        holder["graph"] = graph
        return {"n_nodes": int(graph.selected.sum()), "n_edges": graph.n_edges,
                "faithfulness": graph.attrs["faithfulness"], "threshold": graph.attrs["threshold"]}

    res = store.run(spec, build, name=name, force=force, log=lambda m: log(m, ctx_globals=gl))
    saved(gl, res)
    from icl_cli.circuit.graph import read_h5

    graph = holder.get("graph") or read_h5(res.artifact.file("circuit.h5"))
    data = summary(res.artifact.key, graph)
    emit(gl, data, table=lambda: _tables(data, graph, top), keys=[res.artifact.key])


def _estimate(gl, model, task, dicts, p, edge_rows, device, dtype, measure: bool):
    """The memory and time estimate, from the config, the tokenizer and the dictionaries only."""
    import contextlib

    import torch
    import transformers as tr

    from icl_cli.core.hub import offline_unless_reachable

    from icl_cli.circuit.compute import context_length, prompt_batch
    from icl_cli.circuit.estimate import Shapes, estimate, free_memory, measure_throughput
    from icl_cli.core.models import load_tokenizer, resolve_source

    source, local = resolve_source(model)
    try:
        with offline_unless_reachable() if not local else contextlib.nullcontext():
            config = tr.AutoConfig.from_pretrained(source, trust_remote_code=gl.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise IclError(f"could not read the config of {model}: {str(exc).strip().splitlines()[0]}") from exc
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
