"""Faithfulness of stored circuits (SPEC §7): curves on held-out prompts and the cross-task matrix.

    rep = evaluate_circuits(hm, tokenizer, dicts, [(key, graph)], tasks, FaithOptions(cross_task=True))
    rep.curves[0].keep, rep.cross[0].F, rep.to_json()

1. Prompts: each circuit is measured on prompts drawn like its own (its n_prompts, n_shot,
   template, single-token filter) but with seed + 101 (the paper's held-out seed), so neither the
   node effects nor the selection saw them; ``in_sample`` uses the circuit's own seed instead and
   every result says which ("held-out" / "in-sample").
2. Nodes: the circuit's graph (every feature node it stores); a feature the graph lacks is never
   ablated. m(M) = the unablated model on the measured prompts, m(∅) = every graph node ablated
   at its role's tokens (to the circuit's baseline, taken on the measured prompts).
3. Curves, on the circuit's own task: F(top n kept) and F(top n ablated), nodes ranked by signed
   IE (positive first; the paper's) or by |IE|, n on a 1-2-5 grid up to ``max_nodes``. A curve
   whose grid stops before the graph's last node is ``cut_off``.
4. Cross-task cell (A, B): A's graph on B's prompts (drawn with A's settings); m(M) = the
   unablated model on B (so every circuit shares it on B), m(∅) = A's graph ablated,
   m_circuit = A's selected nodes ablated (the rest kept), F = (m_circuit − m(∅))/(m(M) − m(∅));
   None when A's graph does not move B's metric (|m(M) − m(∅)| ≤ 1e-6).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Mapping, Sequence

from icl_cli.circuit.compute import CircuitParams, context_length, prompt_batch
from icl_cli.circuit.faithfulness import RANKS, Faith, ablated_metric, ranking_from_graph, site_acts
from icl_cli.circuit.splice import Baseline, Groups, Key
from icl_cli.core.errors import IclError
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import Task

HELD_OUT_SEED_OFFSET = 101
"""Held-out prompts use the circuit's seed plus this (the paper's choice)."""
UNDEFINED = 1e-6
"""|m(M) − m(∅)| at or below this: F is undefined."""


@dataclass
class FaithOptions:
    max_nodes: int = 1000
    """The largest node count on the curves."""
    cross_task: bool = False
    """Also measure every circuit on the prompts of every task."""
    in_sample: bool = False
    """Measure on the prompts the circuit was selected on (labelled in-sample) instead of held-out ones."""
    rank: str = "signed"
    """Order of the top n nodes on the curves: signed (IE, positive first; the paper's) or abs (|IE|)."""
    n_shot: int | None = None
    """Examples per measured prompt (default: the circuit's)."""
    n_prompts: int | None = None
    """Measured prompts per task (default: the circuit's)."""
    curves: bool = True
    """Measure the curves (False: only the cross-task matrix)."""

    def __post_init__(self) -> None:
        if self.max_nodes < 1:
            raise IclError(f"--max-nodes must be ≥ 1 (got {self.max_nodes}): the curves need at least one node")
        if self.rank not in RANKS:
            raise IclError(f"unknown --rank {self.rank!r}; use signed (IE, positive first) or abs (|IE|)")
        if self.n_shot is not None and self.n_shot < 2:
            raise IclError("--n-shot must be ≥ 2 (the metric skips the first pair)")
        if self.n_prompts is not None and self.n_prompts < 1:
            raise IclError("--n-prompts must be ≥ 1")

    @property
    def prompts(self) -> str:
        return "in-sample" if self.in_sample else "held-out"


@dataclass
class Curve:
    """F against n for one circuit on its own task (step 3)."""

    circuit: str
    task: str
    n: list[int]
    keep: list[float]
    """F with only the top n graph nodes kept."""
    ablate: list[float]
    """F with the top n graph nodes ablated."""
    n_selected: int
    """Feature nodes the circuit selected."""
    n_graph: int
    """Feature nodes in the circuit's graph: the last point of an uncut curve."""
    m_full: float
    m_empty: float
    prompts: str
    seed: int
    rank: str

    @property
    def cut_off(self) -> bool:
        return self.n[-1] < self.n_graph

    def to_json(self) -> dict:
        d = asdict(self)
        del d["circuit"]
        return {**d, "max_nodes": self.n[-1], "cut_off": self.cut_off}


@dataclass
class CrossCell:
    """Circuit A (``circuit``, of ``circuit_task``) measured on ``task`` (step 4)."""

    circuit: str
    circuit_task: str
    task: str
    m_full: float
    m_empty: float
    m_circuit: float
    """m with A's selected feature nodes ablated."""
    F: float | None


@dataclass
class FaithReport:
    circuits: list[tuple[str, str]]
    """(key, task) of each circuit, in order."""
    tasks: list[str]
    """The measured tasks (columns of the cross-task matrix)."""
    options: FaithOptions
    curves: list[Curve] = field(default_factory=list)
    cross: list[CrossCell] = field(default_factory=list)

    def to_json(self) -> dict:
        o = self.options
        out = {"prompts": o.prompts, "seed_offset": 0 if o.in_sample else HELD_OUT_SEED_OFFSET, "rank": o.rank,
               "curves": {c.circuit: c.to_json() for c in self.curves}}
        if o.cross_task:
            F = {(c.circuit, c.task): c.F for c in self.cross}
            out["cross_task"] = {"rows": [t for _, t in self.circuits], "circuits": [k for k, _ in self.circuits],
                                 "cols": self.tasks, "matrix": [[F[(k, t)] for t in self.tasks] for k, _ in self.circuits],
                                 "cells": [asdict(c) for c in self.cross]}
        return out


def circuit_params(attrs: Mapping, opts: FaithOptions) -> CircuitParams:
    """The prompt settings of a stored circuit (its graph's attributes), with the measurement's
    n_shot / n_prompts and seed (step 1)."""
    known = {f.name for f in fields(CircuitParams)}
    p = CircuitParams(**{k: v for k, v in attrs.items() if k in known})
    return CircuitParams(**{**asdict(p), "n_shot": opts.n_shot or p.n_shot, "n_prompts": opts.n_prompts or p.n_prompts,
                            "seed": p.seed + (0 if opts.in_sample else HELD_OUT_SEED_OFFSET)})


@dataclass
class _Setting:
    """Measured prompts of one task under one circuit's settings."""

    batch: object
    groups: Groups
    base: Baseline
    m_full: float
    seed: int


def evaluate_circuits(hm: HookedModel, tokenizer, dicts: Mapping[Key, object], circuits: Sequence[tuple[str, object]],
                      tasks: Sequence[Task], opts: FaithOptions,
                      progress: Callable[[str], None] | None = None) -> FaithReport:
    """Steps 1-4 for ``circuits`` [(key, CircuitGraph)] built with ``dicts``; the cross-task matrix
    over ``tasks``. Each circuit's own task is resolved from ``tasks`` or its graph's attributes."""
    from icl_cli.core.tasks import resolve_tasks

    say = progress or (lambda m: None)
    device = next(iter(dicts.values())).W_dec.device
    max_len = context_length(hm.model.config)
    by_name = {t.name: t for t in tasks}
    cache: dict[tuple, _Setting] = {}

    def setting(graph, task: Task) -> _Setting:
        p = circuit_params(graph.attrs, opts)
        key = (task.name, p.n_prompts, p.n_shot, p.seed, p.template, p.single_token, p.baseline, p.per_position,
               p.prompt_positions)
        if key not in cache:
            _, batch = prompt_batch(tokenizer, task, p, max_len, device)
            groups = Groups.of(batch, p.per_position, p.prompt_positions)
            base = Baseline.of(p.baseline, groups, site_acts(hm, batch, dicts))
            cache[key] = _Setting(batch, groups, base, ablated_metric(hm, batch, dicts, groups, base, {}), p.seed)
        return cache[key]

    def own_task(graph) -> Task:
        name = (graph.attrs.get("tasks") or [None])[0]
        return by_name.get(name) or resolve_tasks(name)[0]

    def metric(s: _Setting, ablate) -> float:
        return ablated_metric(hm, s.batch, dicts, s.groups, s.base, ablate)

    rep = FaithReport([(k, own_task(g).name) for k, g in circuits], [t.name for t in tasks], opts)
    for key, graph in circuits if opts.curves else []:
        task = own_task(graph)
        say(f"faithfulness curves of circuit {key[:12]} ({task.name}, {opts.prompts} prompts)")
        s = setting(graph, task)
        r = ranking_from_graph(graph, dicts, s.groups, order=opts.rank)
        m_empty = metric(s, r.mask(0, keep=True, device=device))
        if abs(s.m_full - m_empty) <= UNDEFINED:
            raise IclError(f"ablating every node of circuit {key[:12]} leaves the metric of {task.name} at {s.m_full:.4f} on "
                           f"its {opts.prompts} prompts: faithfulness is undefined; use a circuit over more layers")
        faith = Faith(s.m_full, m_empty)
        ns = curve_grid(min(opts.max_nodes, len(r)))
        keep = [faith(metric(s, r.mask(n, keep=True, device=device))) for n in ns]
        drop = [faith(metric(s, r.mask(n, keep=False, device=device))) for n in ns]
        rep.curves.append(Curve(key, task.name, ns, keep, drop, int(((graph.feature >= 0) & graph.selected).sum()),
                                len(r), s.m_full, m_empty, opts.prompts, s.seed, opts.rank))
    for key, graph in circuits if opts.cross_task else []:
        for task in tasks:
            say(f"ablating circuit {key[:12]} on {task.name}")
            s = setting(graph, task)
            every = ranking_from_graph(graph, dicts, s.groups)
            chosen = ranking_from_graph(graph, dicts, s.groups, only_selected=True)
            m_empty = metric(s, every.mask(0, keep=True, device=device))
            m_circuit = metric(s, chosen.mask(len(chosen), keep=False, device=device))
            F = None if abs(s.m_full - m_empty) <= UNDEFINED else Faith(s.m_full, m_empty)(m_circuit)
            rep.cross.append(CrossCell(key, own_task(graph).name, task.name, s.m_full, m_empty, m_circuit, F))
    return rep


def curve_grid(n_max: int) -> list[int]:
    """0, 1, 2, 5, 10, 20, 50, ... up to and including n_max."""
    out, base = [0], 1
    while base <= n_max:
        out += [n for n in (base, 2 * base, 5 * base) if n <= n_max]
        base *= 10
    return sorted({*out, n_max})


def first_reach(n: Sequence[int], f: Sequence[float], level: float, rising: bool = True) -> int | None:
    """The smallest measured n where curve f reaches ``level`` (≥ when rising, ≤ otherwise)."""
    return next((int(k) for k, v in zip(n, f) if (v >= level if rising else v <= level)), None)

