"""Influence pruning (prune.py) against brute force: influence as the sum over every path to the
output of the product of input shares along it, thresholds by sorting in plain Python, and
reachability by recursion."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from icl_cli.circuit.prune import influence, prune
from icl_cli.core.errors import IclError


def layered_dag(seed: int, layers: int = 4, width: int = 4, p_edge: float = 0.6):
    """Random DAG: nodes in layers, edges from layer i to layers i+1.. (and to the output, the last node)."""
    rng = random.Random(seed)
    n = layers * width + 1
    out = n - 1
    edges = {}
    for u in range(layers * width):
        lu = u // width
        for d in list(range((lu + 1) * width, layers * width)) + [out]:
            if rng.random() < p_edge:
                edges[(u, d)] = rng.choice([-1, 1]) * rng.uniform(0.05, 2.0)
    return n, out, edges


def shares_by_hand(edges: dict) -> dict:
    into: dict[int, float] = {}
    for (u, d), w in edges.items():
        into[d] = into.get(d, 0.0) + abs(w)
    return {(u, d): abs(w) / into[d] for (u, d), w in edges.items()}


def influence_by_paths(n: int, out: int, edges: dict) -> list[float]:
    """Σ over all paths u → … → out of the product of shares (enumerated one by one)."""
    share = shares_by_hand(edges)
    succ = {u: [d for (a, d) in edges if a == u] for u in range(n)}

    def paths(u):
        if u == out:
            yield [out]
            return
        for d in succ[u]:
            for rest in paths(d):
                yield [u] + rest

    result = []
    for u in range(n):
        total = 0.0
        for path in (paths(u) if u != out else []):
            total += math.prod(share[(a, b)] for a, b in zip(path, path[1:]))
        result.append(total)
    return result


def cut_by_hand(scores: list[float], fraction: float) -> float:
    ranked = sorted(scores, reverse=True)
    total = sum(ranked)
    if total <= 0:
        return math.inf
    running = 0.0
    for s in ranked:
        running += s
        if running / total >= fraction:
            return s
    return ranked[-1]


def expected(n, out, edges, node_t, edge_t):
    infl = influence_by_paths(n, out, edges)
    cut = cut_by_hand(infl, node_t)
    nodes = {u for u in range(n) if infl[u] >= cut} | {out}
    sub = {e: w for e, w in edges.items() if e[0] in nodes and e[1] in nodes}
    infl2 = influence_by_paths(n, out, sub)
    share2 = shares_by_hand(sub)
    scores = {e: share2[e] * (infl2[e[1]] + (1.0 if e[1] == out else 0.0)) for e in sub}
    ecut = cut_by_hand(list(scores.values()), edge_t)
    kept_edges = {e for e, s in scores.items() if s >= ecut}

    def reaches(u, seen=()):
        return u == out or any(reaches(d) for (a, d) in kept_edges if a == u and d in nodes)

    final = {u for u in nodes if reaches(u)}
    return final, {e for e in kept_edges if e[0] in final and e[1] in final}, infl


@pytest.mark.parametrize("seed", range(6))
def test_influence_is_the_sum_over_paths(seed):
    n, out, edges = layered_dag(seed)
    src, dst = np.array([e[0] for e in edges]), np.array([e[1] for e in edges])
    got = influence(n, src, dst, np.array(list(edges.values())), out)
    assert np.allclose(got, influence_by_paths(n, out, edges), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed,node_t,edge_t", [(s, nt, et) for s, (nt, et) in
                                                 zip(range(8), itertools.cycle([(0.8, 0.98), (0.5, 0.9), (0.95, 0.7),
                                                                                (1.0, 1.0)]))])
def test_kept_nodes_and_edges_match_brute_force(seed, node_t, edge_t):
    n, out, edges = layered_dag(seed, layers=5, width=3)
    keys = list(edges)
    p = prune(n, [e[0] for e in keys], [e[1] for e in keys], [edges[e] for e in keys], out, node_t, edge_t)
    nodes, kept, infl = expected(n, out, edges, node_t, edge_t)
    assert set(np.flatnonzero(p.node_mask).tolist()) == nodes
    assert {keys[i] for i in np.flatnonzero(p.edge_mask)} == kept
    # no isolated node, and each kept node but the output has a kept edge out
    for u in nodes - {out}:
        assert any(a == u for a, _ in kept)
    # the cumulative share: rank by influence, add up
    order = sorted(range(n), key=lambda u: -infl[u])
    running = 0.0
    for u in order:
        running += infl[u]
        assert math.isclose(p.cumulative[u], running / sum(infl), rel_tol=1e-9)


def test_threshold_keeps_exactly_the_top_share():
    # a star into the output: influence = each edge's share, so the top nodes are known by hand
    w = [5.0, 3.0, 1.0, 0.5, 0.5]  # shares 0.5, 0.3, 0.1, 0.05, 0.05
    n, out = 6, 5
    p = prune(n, range(5), [out] * 5, w, out, node_threshold=0.8, edge_threshold=1.0)
    assert np.flatnonzero(p.node_mask).tolist() == [0, 1, out]  # 0.5 + 0.3 reaches 0.8
    p = prune(n, range(5), [out] * 5, [-x for x in w], out, node_threshold=0.81, edge_threshold=1.0)
    assert np.flatnonzero(p.node_mask).tolist() == [0, 1, 2, out]  # signs do not matter
    assert np.allclose(p.cumulative[:5], [0.5, 0.8, 0.9, 0.95, 1.0])


def test_output_kept_when_nothing_reaches_it():
    p = prune(3, [0], [1], [1.0], output=2)
    assert p.node_mask.tolist() == [False, False, True] and not p.edge_mask.any()


def test_cycle_and_bad_thresholds_are_errors():
    with pytest.raises(IclError, match="cycle"):
        prune(3, [0, 1, 1], [1, 0, 2], [1.0, 1.0, 1.0], output=2)
    with pytest.raises(IclError, match="node_threshold"):
        prune(2, [0], [1], [1.0], output=1, node_threshold=1.5)
