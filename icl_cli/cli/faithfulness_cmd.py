"""Faithfulness of circuits (SPEC §7), reached through ``icl ablate --circuit``.

    icl ablate --circuit CIRCUIT_REF --max-nodes 2000
    icl ablate --circuit REF_A,REF_B,REF_C --cross-task          # ablate circuit A, measure task B
    icl ablate --circuit REF_A --cross-task --tasks antonyms,en_es
    icl ablate --circuit REF_A --in-sample --rank abs             # on the selection's own prompts, by |IE|

For each circuit: F against n for "keep the top n nodes" and "ablate the top n nodes" (n on a
1-2-5 grid up to --max-nodes) on held-out prompts (seed + 101). With --cross-task: for every
circuit A and task B, F on B's prompts with A's selected nodes ablated (low F: A's circuit
matters for B). The computation is circuit/faithfulness_step.py; this file parses and renders.
"""

from __future__ import annotations

import typer

from icl_cli.cli.common import run_env
from icl_cli.cli.context import emit, g


def faithfulness_cmd(ctx: typer.Context, circuit: str, tasks: str | None, cross_task: bool, max_nodes: int,
                     name: str | None, force: bool, *, in_sample: bool = False, rank: str = "signed",
                     model: str | None = None, n_shot: int | None = None, n_prompts: int | None = None) -> None:
    """Curves (and the cross-task matrix) for the circuit artifacts in ``circuit`` (comma-separated)."""
    from icl_cli.circuit.evaluate import FaithOptions
    from icl_cli.circuit.faithfulness_step import FaithRequest, run_faithfulness

    gl = g(ctx)
    opts = FaithOptions(max_nodes=max_nodes, cross_task=cross_task, in_sample=in_sample, rank=rank, n_shot=n_shot,
                        n_prompts=n_prompts)
    out = run_faithfulness(run_env(gl), FaithRequest(circuit, tasks, opts, model=model, name=name, force=force))
    emit(gl, out.data, table=lambda: _tables(out.data), keys=[out.result.artifact.key])


def reached(c: dict, level: float, rising: bool) -> str:
    """Where a curve first reaches ``level``, or how far it got: never a bare "not reached"."""
    from icl_cli.circuit.evaluate import first_reach

    f = c["keep"] if rising else c["ablate"]
    n = first_reach(c["n"], f, level, rising)
    if n is not None:
        return f"{n} nodes"
    best = max(f) if rising else min(f)
    within = f"within {c['n'][-1]}" if c.get("cut_off", True) else f"by all {c['n'][-1]} graph nodes"
    return f"not reached {within} (F reached {best:.2f})"


def _tables(data: dict):
    from rich.table import Table

    tabs = []
    for key, c in data["curves"].items():
        where = c.get("prompts", "in-sample")
        t = Table(title=f"faithfulness of circuit {key[:12]} ({c['task']}) on {where} prompts (seed {c.get('seed')}); "
                        f"{c['n_selected']} selected of {c.get('n_graph', '?')} feature nodes")
        for col in (f"top n nodes (by {'IE' if c.get('rank') == 'signed' else '|IE|'})", "F keeping them", "F ablating them"):
            t.add_column(col, justify="right")
        for n, k, a in zip(c["n"], c["keep"], c["ablate"]):
            t.add_row(str(n), f"{k:.3f}", f"{a:.3f}")
        t.caption = (f"m(M) {c['m_full']:.3f} (unablated), m(∅) {c['m_empty']:.3f} (every graph node ablated); "
                     f"F = (m − m(∅))/(m(M) − m(∅)). F ≥ 0.8 keeping: {reached(c, 0.8, True)}; "
                     f"F ≤ 0.5 ablating: {reached(c, 0.5, False)}")
        tabs.append(t)
    if "cross_task" in data:
        x = data["cross_task"]
        t = Table(title=f"cross-task: F on the column task ({data.get('prompts', 'in-sample')} prompts) with the row "
                        "task's circuit ablated")
        t.add_column("circuit of")
        for col in x["cols"]:
            t.add_column(col, justify="right")
        for name, row in zip(x["rows"], x["matrix"]):
            t.add_row(name, *("undefined" if v is None else f"{v:.2f}" for v in row))
        t.caption = "F = (m_circuit − m(∅))/(m(M) − m(∅)); m(M): the unablated model on the column task, m(∅): the row's graph ablated"
        tabs.append(t)
    return tabs
