"""Prune an attribution graph to the nodes and edges that carry most of the influence on its
output, the way circuit-tracer prunes its graphs before the viewer draws them (Ameisen et al.
2025, "Circuit Tracing", § graph pruning; circuit-tracer's ``prune_graph``).

The graph is a DAG given as an edge list (src → dst, signed weight) over ``n`` nodes, one of
which is the output. Â[d, u] = |w(u → d)| / Σ_v |w(v → d)|: u's share of d's direct input.

1. Node influence: the share of the output that reaches it along all paths,
   influence = e_out · (Â + Â² + …), e_out = 1 at the output, 0 elsewhere (the series stops
   after the graph's depth: Â is nilpotent on a DAG).
2. Keep the nodes of largest influence that together hold ``node_threshold`` of the total: sort
   the scores, find the first one at which their cumulative share reaches the threshold, keep
   every node scoring at least that much. The output is always kept.
3. Edge influence in the graph of kept nodes: Â′[d, u] · (e_out + influence′)[d], with Â′ and
   influence′ recomputed there; keep the edges that hold ``edge_threshold`` of the total, alike.
4. Until nothing changes: drop every node (the output excepted) without a kept outgoing edge, and
   every edge at a dropped node. Every kept node then reaches the output; none is isolated.
5. ``cumulative``: each node's cumulative share of influence when the nodes are ranked by it,
   so the most influential node has the smallest value; a viewer's pruning slider at t shows
   the nodes with cumulative ≤ t.

    p = prune(n, src, dst, weight, output=n - 1, node_threshold=0.8, edge_threshold=0.98)
    p.node_mask, p.edge_mask, p.influence, p.cumulative
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from icl_cli.core.errors import IclError


class Pruned(NamedTuple):
    node_mask: np.ndarray  # [N] bool, nodes kept
    edge_mask: np.ndarray  # [E] bool, edges kept
    influence: np.ndarray  # [N] float64, step 1 on the whole graph
    cumulative: np.ndarray  # [N] float64, step 5


def input_shares(n: int, dst: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """[E] Â of each edge: |weight| over the summed |weight| of the edges into its dst."""
    a = np.abs(np.asarray(weight, dtype=np.float64))
    into = np.bincount(dst, weights=a, minlength=n)
    return np.divide(a, into[dst], out=np.zeros_like(a), where=into[dst] > 0)


def influence(n: int, src: np.ndarray, dst: np.ndarray, weight: np.ndarray, output: int) -> np.ndarray:
    """[N] e_out · (Â + Â² + …): one term per step back from the output, until no path is left."""
    share = input_shares(n, dst, weight)
    current = np.zeros(n)
    current[output] = 1.0
    total = np.zeros(n)
    for _ in range(n + 1):
        current = np.bincount(src, weights=share * current[dst], minlength=n)  # current @ Â
        if not current.any():
            return total
        total += current
    raise IclError("the attribution graph has a cycle: its edges must run from upstream to downstream sites")


def threshold_score(scores: np.ndarray, fraction: float) -> float:
    """The smallest score to keep so that the kept scores hold ``fraction`` of the total (step 2)."""
    if not len(scores) or float(scores.sum()) <= 0:
        return np.inf
    ranked = np.sort(scores)[::-1]
    share = np.cumsum(ranked) / ranked.sum()
    i = min(int(np.searchsorted(share, fraction)), len(ranked) - 1)
    return float(ranked[i])


def prune(n: int, src, dst, weight, output: int, node_threshold: float = 0.8,
          edge_threshold: float = 0.98) -> Pruned:
    """Steps 1-5 on the graph of ``n`` nodes and edges src[e] → dst[e] with ``weight[e]``."""
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise IclError(f"{name} must lie in [0, 1], got {t}")
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    weight = np.asarray(weight, dtype=np.float64)
    infl = influence(n, src, dst, weight, output)
    nodes = infl >= threshold_score(infl, node_threshold)
    nodes[output] = True

    inside = nodes[src] & nodes[dst]
    sub = np.where(inside, weight, 0.0)
    reach = influence(n, src, dst, sub, output)
    reach[output] += 1.0  # e_out + influence′
    scores = input_shares(n, dst, sub) * reach[dst]
    edges = inside & (scores >= threshold_score(scores[inside], edge_threshold))

    while True:
        has_out = np.bincount(src[edges], minlength=n) > 0
        keep = nodes & (has_out | (np.arange(n) == output))
        edges &= keep[src] & keep[dst]
        if np.array_equal(keep, nodes):
            break
        nodes = keep

    order = np.argsort(-infl, kind="stable")
    cumulative = np.zeros(n)
    total = float(infl.sum())
    cumulative[order] = np.cumsum(infl[order]) / total if total > 0 else 1.0
    return Pruned(nodes, edges, infl, cumulative)
