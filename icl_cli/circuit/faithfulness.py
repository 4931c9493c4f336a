"""Faithfulness of node sets and node selection (SPEC §7; Marks et al. 2024, §3).

1. Ablating a feature node (site, layer, group, feature) sets that feature to its baseline a′ at
   the tokens of its group (splice.Ablating); error nodes are always kept (each site's error is
   recomputed in the ablated pass itself).
2. m(C): the metric when every node of the ranking outside C is ablated (nodes outside the
   ranking, e.g. features a stored graph lacks, are never ablated); m(M) = nothing ablated (the
   unmodified model), m(∅) = every node of the ranking ablated.
   F(C) = (m(C) − m(∅)) / (m(M) − m(∅)), so F(M) = 1 and F(∅) = 0 by construction.
3. Ranking: feature nodes sorted by |IE| (largest first; node selection) or by signed IE
   (positive first; the paper's faithfulness curves); C_n = the top n, threshold = |IE| of the
   n-th node.
4. Selection: F(C_n) on a log-spaced grid of n (the |IE| threshold sweep), then a bisection on n
   between the last grid point below the target and the first one at or above it; the circuit is
   the smallest C_n seen with F ≥ target (paper: 0.95). Every evaluated point is kept (the sweep).
5. Curves: F(C_n) ("keep the top n") and F(M \\ C_n) ("ablate the top n") for n on a grid
   (evaluate.py measures them for stored circuits, on held-out prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from icl_cli.circuit.splice import Ablating, Baseline, Groups, Key, ordered, splice_edits
from icl_cli.core.batch import PromptBatch
from icl_cli.core.metrics import all_pairs_logprob
from icl_cli.core.sites import HookedModel
from icl_cli.core.errors import IclError


RANKS = ("abs", "signed")
"""Orders of a Ranking: by |IE| (largest first), or by IE (most positive first)."""


def _order(v: Tensor, order: str) -> Tensor:
    """Indices sorting ``v`` [N] by ``order`` (stable: ties keep their original order)."""
    if order not in RANKS:
        raise IclError(f"unknown ranking {order!r}; use signed (IE, positive first) or abs (|IE|)")
    return torch.argsort(v.abs() if order == "abs" else v, descending=True, stable=True)


@dataclass
class Ranking:
    """Feature nodes in rank order (by |IE| or by signed IE): parallel [N] tensors. The ranking's
    nodes are all a mask can ablate."""

    keys: list[Key]
    shapes: dict[Key, tuple[int, int]]  # key -> (G, F)
    key_idx: Tensor
    group: Tensor
    feature: Tensor
    ie: Tensor

    @classmethod
    def of(cls, ie: Mapping[Key, Tensor], order: str = "abs") -> "Ranking":
        """Every (group, feature) cell of ``ie`` [G,F] per key, ranked by ``order``."""
        keys = ordered(ie)
        k_idx, grp, feat, vals = [], [], [], []
        for i, k in enumerate(keys):
            t = ie[k].detach().float().cpu()
            G, F = t.shape
            k_idx.append(torch.full((G * F,), i, dtype=torch.long))
            grp.append(torch.arange(G).repeat_interleave(F))
            feat.append(torch.arange(F).repeat(G))
            vals.append(t.reshape(-1))
        v = torch.cat(vals)
        order = _order(v, order)
        return cls(keys, {k: tuple(ie[k].shape) for k in keys}, torch.cat(k_idx)[order], torch.cat(grp)[order],
                   torch.cat(feat)[order], v[order])

    def __len__(self) -> int:
        return int(len(self.ie))

    @property
    def n_nonzero(self) -> int:
        return int((self.ie != 0).sum())

    def threshold(self, n: int) -> float:
        """|IE| of the n-th node (inf for n = 0)."""
        return float("inf") if n <= 0 else float(self.ie[min(n, len(self)) - 1].abs())

    def mask(self, n: int, keep: bool, device=None) -> dict[Key, Tensor]:
        """Ablation masks [G,F] per key: keep=True ablates the ranking's nodes after the top n,
        keep=False its top n; cells that are not nodes of the ranking are never ablated."""
        lo, hi = (n, len(self)) if keep else (0, n)
        out = {k: torch.zeros(self.shapes[k], dtype=torch.bool) for k in self.keys}
        for i, k in enumerate(self.keys):
            part = self.key_idx[lo:hi] == i
            out[k][self.group[lo:hi][part], self.feature[lo:hi][part]] = True
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


def ablated_metric(hm: HookedModel, batch: PromptBatch, dicts: Mapping[Key, object], groups: Groups,
                   base: Baseline, ablate: Mapping[Key, Tensor]) -> float:
    """m with the marked feature nodes ablated (step 1); one forward pass, no gradients."""
    keys = [k for k in ordered(dicts) if k in ablate and bool(ablate[k].any())]
    h = Ablating(dicts, groups, base, ablate)
    out = hm.run(batch.input_ids, batch.attention_mask, edit=splice_edits(keys, h))
    return float(all_pairs_logprob(out.logits, batch))


@dataclass
class Faith:
    """The two reference points of step 2 and F for any node set."""

    m_full: float
    m_empty: float

    def __call__(self, m: float) -> float:
        return (m - self.m_empty) / (self.m_full - self.m_empty)


def reference(hm: HookedModel, batch: PromptBatch, dicts, groups: Groups, base: Baseline, r: Ranking) -> Faith:
    """m(M) (the unablated model) and m(∅) (every node of ``r`` ablated) on ``batch``."""
    dev = groups.index.device
    m_full = ablated_metric(hm, batch, dicts, groups, base, {})
    m_empty = ablated_metric(hm, batch, dicts, groups, base, r.mask(0, keep=True, device=dev))
    if not abs(m_full - m_empty) > 1e-6:
        raise IclError(f"ablating every feature leaves the metric at {m_full:.4f}: faithfulness is undefined; "
                       "use more layers (--layers) or --baseline zero")
    return Faith(m_full, m_empty)


@dataclass
class Selection:
    n: int
    threshold: float
    faithfulness: float
    faith: Faith
    sweep_n: np.ndarray
    sweep_threshold: np.ndarray
    sweep_faithfulness: np.ndarray


def grid(n_max: int, points: int = 16) -> list[int]:
    """0, then ``points`` log-spaced counts from 1 to n_max."""
    if n_max <= 0:
        return [0]
    return [0, *sorted({int(round(x)) for x in np.geomspace(1, n_max, points)})]


def select(hm: HookedModel, batch: PromptBatch, dicts, groups: Groups, base: Baseline, r: Ranking,
           target: float = 0.95, points: int = 16, bisect_steps: int = 6,
           progress: Callable[[str], None] | None = None) -> Selection:
    """Steps 3-4: the smallest top-n node set with F ≥ target, and the sweep."""
    faith = reference(hm, batch, dicts, groups, base, r)
    dev = groups.index.device
    seen = {0: faith(faith.m_empty), len(r): faith(faith.m_full)}  # 0 and 1 by construction

    def F(n: int) -> float:
        if n not in seen:
            if progress:
                progress(f"faithfulness of {n} nodes")
            seen[n] = faith(ablated_metric(hm, batch, dicts, groups, base, r.mask(n, keep=True, device=dev)))
        return seen[n]

    ns = grid(r.n_nonzero, points)
    first = next((n for n in ns if F(n) >= target), len(r))
    below = max((n for n in seen if n < first and seen[n] < target), default=0)
    lo, hi = below, first
    for _ in range(bisect_steps):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if F(mid) >= target:
            hi = mid
        else:
            lo = mid
    best = min(n for n, f in seen.items() if f >= target)
    ks = sorted(seen)
    return Selection(best, r.threshold(best), seen[best], faith, np.array(ks, dtype=np.int64),
                     np.array([r.threshold(n) for n in ks], dtype=np.float64),
                     np.array([seen[n] for n in ks], dtype=np.float64))


def curves(hm: HookedModel, batch: PromptBatch, dicts, groups: Groups, base: Baseline, r: Ranking,
           ns: Sequence[int], faith: Faith | None = None,
           progress: Callable[[str], None] | None = None) -> tuple[Faith, np.ndarray, np.ndarray]:
    """Step 5: (faith, F keeping the top n [len(ns)], F ablating the top n [len(ns)])."""
    faith = faith or reference(hm, batch, dicts, groups, base, r)
    dev = groups.index.device
    keep, drop = [], []
    for n in ns:
        if progress:
            progress(f"top {n}")
        keep.append(faith(ablated_metric(hm, batch, dicts, groups, base, r.mask(n, keep=True, device=dev))))
        drop.append(faith(ablated_metric(hm, batch, dicts, groups, base, r.mask(n, keep=False, device=dev))))
    return faith, np.array(keep), np.array(drop)


def site_acts(hm: HookedModel, batch: PromptBatch, dicts) -> dict[Key, tuple[Tensor, Tensor]]:
    """(a [B,P,F], e [B,P,D]) at every site of the unmodified model (no gradients): what a mean
    baseline is taken from."""
    from icl_cli.circuit.splice import split

    acts: dict[Key, tuple[Tensor, Tensor]] = {}

    def record(key: Key, x_in: Tensor, x_out: Tensor) -> Tensor:
        acts[key] = split(dicts[key], x_in, x_out)
        return x_out

    hm.run(batch.input_ids, batch.attention_mask, edit=splice_edits(ordered(dicts), record))
    return acts


def ranking_from_graph(graph, dicts, groups: Groups, only_selected: bool = False, order: str = "signed") -> Ranking:
    """The feature nodes of a stored CircuitGraph (only its selected ones with ``only_selected``)
    as a Ranking over ``dicts`` and ``groups``, by ``order`` (nodes whose role ``groups`` lacks are
    an error)."""
    keys = ordered(dicts)
    index = {k: i for i, k in enumerate(keys)}
    gi = {name: i for i, name in enumerate(groups.names)}
    rows = [i for i in range(len(graph.site)) if graph.feature[i] >= 0 and (not only_selected or graph.selected[i])]
    missing = sorted({str(graph.role[i]) for i in rows} - set(gi))
    if missing:
        raise IclError(f"the circuit has nodes at {', '.join(missing[:3])} which these prompts lack; "
                       "per-position circuits only apply to prompts of the same length")
    absent = sorted({f"{graph.site[i]}.{graph.layer[i]}" for i in rows} - {f"{k}.{l}" for k, l in keys})
    if absent:
        raise IclError(f"the circuit has nodes at {', '.join(absent[:3])} but no dictionary there")
    ie = torch.tensor([float(graph.ie[i]) for i in rows], dtype=torch.float64)
    order = [rows[j] for j in _order(ie, order).tolist()]
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Ranking(keys, {k: (groups.n, dicts[k].cfg.d_sae) for k in keys},
                   t([index[(str(graph.site[i]), int(graph.layer[i]))] for i in order]),
                   t([gi[str(graph.role[i])] for i in order]), t([int(graph.feature[i]) for i in order]),
                   torch.tensor([float(graph.ie[i]) for i in order]))
