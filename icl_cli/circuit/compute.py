"""One circuit from prompts to graph (SPEC §7): the steps of ``icl circuit`` in order.

1. Sample ``n_prompts`` prompts of ``n_shot`` examples of the task (seeded; with
   ``single_token`` from its pairs whose input and output are one token each), tokenise them and
   find token roles; prompts longer than the model's context are an error.
2. Node IEs on all_pairs_logprob (attribution.py): attribution patching or integrated gradients,
   zero or mean baseline, summed over the tokens of each role (or position) and over prompts.
3. Rank feature nodes by |IE|; sweep the threshold and keep the smallest top-n set with
   faithfulness ≥ ``target`` (faithfulness.py). Error nodes with |IE| ≥ the threshold are marked
   selected too (they are never ablated).
4. Edges between the selected nodes of consecutive sites (edges.py); when more than
   ``edge_nodes`` feature nodes are selected, edges join the top ``edge_nodes`` of them.
5. The CircuitGraph: every node with a non-zero IE or activation, the selected ones flagged,
   the edges, the sweep, the prompts and the parameters.

    params = CircuitParams(n_prompts=8, n_shot=16)
    graph = compute_circuit(hm, tokenizer, task, dicts, params, model="toy-icl")
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from icl_cli.circuit.attribution import NodeScores, node_scores
from icl_cli.circuit.edges import edges
from icl_cli.circuit.faithfulness import Ranking, Selection, select
from icl_cli.circuit.graph import ERROR, CircuitGraph
from icl_cli.circuit.splice import Key, ordered
from icl_cli.core.batch import PromptBatch, encode_prompts
from icl_cli.core.prompts import get_template, render, sample_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import Task
from icl_cli.core.errors import IclError

METHODS = ("atp", "ig")
BASELINES = ("zero", "mean")


@dataclass
class CircuitParams:
    n_prompts: int = 8
    """Few-shot prompts the effects are summed over."""
    n_shot: int = 16
    """Examples per prompt."""
    method: str = "atp"
    """atp (attribution patching) | ig (integrated gradients)."""
    ig_steps: int = 10
    """Integrated-gradient steps (Marks et al.: 10)."""
    baseline: str = "zero"
    """zero | mean (the mean activation over each role's tokens)."""
    per_position: bool = False
    """One node per token position instead of per role."""
    target: float = 0.95
    """Faithfulness the selected circuit must reach (paper: 0.95)."""
    edge_nodes: int = 1000
    """Edges join at most this many selected feature nodes (the top ones by |IE|)."""
    template: str = "paper"
    """Prompt template."""
    seed: int = 0
    """Seed of prompt sampling."""
    single_token: bool = False
    """Only pairs whose input and output are one token each (the paper's circuits), so that
    ablating a role's token cannot leak through the inner tokens of a multi-token word."""
    prompt_positions: bool = False
    """One ``prompt`` node per instruction token (``prompt:<k>``) instead of one for the whole instruction."""

    def __post_init__(self) -> None:
        get_template(self.template)
        if self.method not in METHODS:
            raise IclError(f"unknown --method {self.method!r}; use atp or ig")
        if self.baseline not in BASELINES:
            raise IclError(f"unknown --baseline {self.baseline!r}; use zero or mean")
        if self.n_prompts < 1 or self.n_shot < 2 or self.ig_steps < 1 or self.edge_nodes < 0:
            raise IclError("need --n-prompts ≥ 1, --n-shot ≥ 2 (the metric skips the first pair), --ig-steps ≥ 1")
        if not 0 < self.target <= 1:
            raise IclError(f"the faithfulness target must lie in (0, 1], got {self.target}")
        if self.per_position and self.prompt_positions:
            raise IclError("--per-position already gives one node per position; drop --prompt-positions")


def single_token_pairs(tokenizer, pairs, template: str) -> list[tuple[str, str]]:
    """The pairs whose input and output each lie within one token of a rendered prompt (found from
    the tokenizer's character offsets, so a word's leading space or separator is allowed)."""
    out = []
    for x, y in pairs:
        text, segments = render([], (x, y), template, with_answer=True)
        offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        spans = [(s, e) for s, e, kind, _ in segments if kind in ("input", "output")]
        if all(sum(1 for a, b in offsets if a < e and b > s) == 1 for s, e in spans):
            out.append((x, y))
    return out


def prompt_batch(tokenizer, task: Task, p: CircuitParams, max_len: int | None, device=None) -> tuple[list, PromptBatch]:
    """Step 1: the prompts and their batch."""
    pairs = task.pairs
    if p.single_token:
        pairs = single_token_pairs(tokenizer, pairs, p.template)
        if len(pairs) < p.n_shot + 1:
            raise IclError(f"task {task.name} has {len(pairs)} single-token pairs (of {len(task.pairs)}), too few for "
                           f"{p.n_shot}-shot prompts; lower --n-shot or drop --single-token")
    prompts = sample_prompts(pairs, p.n_prompts, p.n_shot, p.seed, p.template, task_name=task.name)
    batch = encode_prompts(tokenizer, prompts, device=device)
    P = batch.input_ids.shape[1]
    if max_len and P > max_len:
        raise IclError(f"task {task.name}: {p.n_shot}-shot prompts are {P} tokens long, beyond the model's context "
                       f"of {max_len}; lower --n-shot")
    return prompts, batch


def context_length(cfg) -> int | None:
    """The longest input a model config allows (None: unknown)."""
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def selected_nodes(s: NodeScores, r: Ranking, sel: Selection, edge_nodes: int) -> dict[Key, list[tuple[int, int]]]:
    """Step 3-4: key -> [(group, feature)] of the circuit (top ``edge_nodes`` features, errors ≥ threshold)."""
    out: dict[Key, list[tuple[int, int]]] = {}
    for i in range(min(sel.n, edge_nodes)):
        out.setdefault(r.keys[int(r.key_idx[i])], []).append((int(r.group[i]), int(r.feature[i])))
    for k in s.keys:
        for g in torch.nonzero(s.ie_err[k].abs() >= sel.threshold).flatten().tolist():
            out.setdefault(k, []).append((g, ERROR))
    return out


def compute_circuit(hm: HookedModel, tokenizer, task: Task, dicts: Mapping[Key, object], p: CircuitParams,
                    model: str, edge_rows: int = 256,
                    progress: Callable[[str], None] | None = None) -> CircuitGraph:
    """Steps 1-5 for one task."""
    dev = next(iter(dicts.values())).W_dec.device
    prompts, batch = prompt_batch(tokenizer, task, p, context_length(hm.model.config), dev)
    say = progress or (lambda m: None)
    say(f"node effects ({p.method})")
    s = node_scores(hm, batch, dicts, p.method, p.baseline, p.per_position, p.ig_steps, edge_rows, progress,
                    prompt_positions=p.prompt_positions)
    r = Ranking.of(s.ie)
    say("threshold sweep")
    sel = select(hm, batch, dicts, s.groups, s.base, r, p.target)
    chosen = selected_nodes(s, r, sel, p.edge_nodes)
    say(f"edges between {sum(map(len, chosen.values()))} nodes")
    E = edges(hm, batch, dicts, s, chosen, max_rows=edge_rows, progress=progress)
    return to_graph(s, sel, chosen, E, prompts, {
        "model": model, "tasks": [task.name], "metric": "all_pairs_logprob", "layers": sorted({l for _, l in s.keys}),
        **asdict(p), "threshold": sel.threshold, "faithfulness": sel.faithfulness, "m_full": sel.faith.m_full,
        "m_empty": sel.faith.m_empty, "n_selected": sel.n, "edge_feature_nodes": min(sel.n, p.edge_nodes)})


def to_graph(s: NodeScores, sel: Selection, chosen, E, prompts, attrs: dict) -> CircuitGraph:
    """Step 5."""
    rows: dict[tuple, int] = {}
    cols: dict[str, list] = {c: [] for c in ("site", "layer", "role", "feature", "ie", "act", "selected")}
    picked = {(k, g, f) for k, v in chosen.items() for g, f in v}
    top = {(k, g, f) for k, v in _top(s, sel).items() for g, f in v}

    def add(k: Key, g: int, f: int, ie: float, act: float) -> None:
        rows[(k, g, f)] = len(rows)
        for c, v in zip(cols, (k[0], k[1], s.groups.names[g], f, ie, act, (k, g, f) in top or (k, g, f) in picked)):
            cols[c].append(v)

    for k in ordered(s.keys):
        ie, act = s.ie[k].detach().cpu(), s.act[k].detach().cpu()
        for g, f in torch.nonzero((ie != 0) | (act != 0)).tolist():
            add(k, g, f, float(ie[g, f]), float(act[g, f]))
        for g in range(s.groups.n):
            if float(s.err_norm[k][g]) > 0:
                add(k, g, ERROR, float(s.ie_err[k][g]), float(s.err_norm[k][g]))
    E = [e for e in E if e.src in rows and e.dst in rows and e.weight != 0]
    return CircuitGraph(
        site=np.array(cols["site"], dtype=str), layer=np.array(cols["layer"], dtype=np.int64),
        role=np.array(cols["role"], dtype=str), feature=np.array(cols["feature"], dtype=np.int64),
        ie=np.array(cols["ie"], dtype=np.float32), act=np.array(cols["act"], dtype=np.float32),
        selected=np.array(cols["selected"], dtype=bool),
        edge_src=np.array([rows[e.src] for e in E], dtype=np.int64),
        edge_dst=np.array([rows[e.dst] for e in E], dtype=np.int64),
        edge_weight=np.array([e.weight for e in E], dtype=np.float32),
        sweep_threshold=sel.sweep_threshold, sweep_n_nodes=sel.sweep_n, sweep_faithfulness=sel.sweep_faithfulness,
        prompts=[pr.text for pr in prompts], attrs=attrs)


def _top(s: NodeScores, sel: Selection) -> dict[Key, list[tuple[int, int]]]:
    """Every feature node of the selected top-n set (edges may cover fewer)."""
    r = Ranking.of(s.ie)
    out: dict[Key, list[tuple[int, int]]] = {}
    for i in range(sel.n):
        out.setdefault(r.keys[int(r.key_idx[i])], []).append((int(r.group[i]), int(r.feature[i])))
    return out
