"""Edges between the nodes of consecutive sites (SPEC §7; Marks et al. 2024, §2.2, appendix on
edge attribution), many downstream nodes per backward pass.

Consecutive sites: resid[l] → attn[l], resid[l] → transcoder[l], attn[l] → transcoder[l], and
resid[l], attn[l], transcoder[l] → resid[l+1]; the paths through an intermediate site are held
fixed (resid[l] → transcoder[l] is the direct path only; Marks et al. stop gradients there too).

1. edge(u → d) = Σ_{tokens p of d's group} Σ_{tokens q of u's group}
                 ∂m/∂a_d[p] · ∂a_d[p]/∂a_u[q] · (a_u[q] − a′_u[q]),
   with ∂m/∂a_d from the clean pass; for an error node read e, ∂m/∂e and ⟨·,·⟩ over d_model.
2. One pass per chunk of downstream nodes runs block l once on the B prompt rows (start_at = l,
   from the clean resid_pre[l]) and stops once the downstream site is reached. Every site of
   layer l is frozen: it writes x_out.detach() + δ_u, δ_u [B,P,D] a zero leaf (only for the sites
   u that feed the downstream site), so ∂/∂δ_u is the gradient at u's output and
   ∂/∂a_u = ∂/∂δ_u · W_dec,uᵀ. Into resid[l+1] no pass is needed: with block l frozen,
   resid_pre[l+1] = clean + Σ_u δ_u, so ∂/∂δ_u is the seed itself.
3. Seeds at the downstream site's input x, in closed form: the standard, JumpReLU, gated and
   top-k encoders are a = φ(x′·W + b), x′ = x − b_dec, with φ′ ∈ {0, 1} (JumpReLU's step and the
   gate have zero derivative; gated: W = W_enc·exp(r_mag), the magnitude path), so
   ∂a_f/∂x = [a_f > 0]·W[:, f] and feature row k (feature f_k, group g_k) has the seed
   s_k[b,p,:] = w_k[b,p]·[a_f_k[b,p] > 0]·W[:, f_k], w_k = ∂m/∂a_d[·, f_k] on g_k's tokens,
   zero elsewhere: no autograd through the encoder, nothing of size [K,B,P,F]. Other dictionary
   classes: autograd through encode (the columns needed). Error row: ∂m/∂e on its group's
   tokens at the site's output, and its pull-back −(∂ decode(encode(x))/∂x)ᵀ(·) at x.
4. The K seeds share the one forward graph: their vector-Jacobian products are one backward
   batched over the seeds (autograd.grad(is_grads_batched=True), vmap over the backward graph),
   or, where vmap fails, one backward per seed on the retained graph.
5. Edge weights for the selected upstream nodes: for each upstream group g, Σ over g's tokens
   of (∂/∂δ_u · W_dec,u[f]ᵀ)·(a_u − a′_u)[f] (only g's tokens enter the products).
``method="tiled"`` tiles the prompt batch K times instead and differentiates through the encoder
(edges_ref.py), ``method="per-node"`` is that with K = 1, one backward per downstream node: the
references for the tests and benchmarks/circuit_edges.py.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from icl_cli.circuit.attribution import NodeScores
from icl_cli.circuit.edge_types import Captured as _Captured, Edge, Node, encode_cols, upstream
from icl_cli.circuit.splice import Key, splice_edits
from icl_cli.core.batch import PromptBatch
from icl_cli.core.sites import HookedModel, Site
from icl_cli.dictionaries.gated import GatedSAE
from icl_cli.dictionaries.jumprelu import JumpReLUSAE
from icl_cli.dictionaries.standard import StandardSAE
from icl_cli.dictionaries.topk import TopKSAE
from icl_cli.core.errors import IclError

METHODS = ("batched", "tiled", "per-node")


def edges(hm: HookedModel, batch: PromptBatch, dicts: Mapping[Key, object], s: NodeScores,
          selected: Mapping[Key, Sequence[tuple[int, int]]], max_rows: int = 256, method: str = "batched",
          progress: Callable[[str], None] | None = None) -> list[Edge]:
    """Every edge between selected nodes of consecutive sites. selected: key -> [(group, feature)].
    A chunk holds K = max_rows // B downstream nodes (K = 1 for method "per-node")."""
    if method not in METHODS:
        raise IclError(f"unknown edge method {method!r}; use one of {', '.join(METHODS)}")
    if method == "batched":
        chunk = _chunk
    else:
        from icl_cli.circuit.edges_ref import tiled_chunk as chunk
    B = len(batch)
    K = 1 if method == "per-node" else max(1, max_rows // max(B, 1))
    out: list[Edge] = []
    for l in sorted({l for _, l in s.keys}):
        downs = [k for k in (("attn", l), ("transcoder", l), ("resid", l + 1)) if k in dicts and selected.get(k)]
        ups = [k for k in (("resid", l), ("attn", l), ("transcoder", l)) if k in dicts and selected.get(k)]
        if not ups:
            continue
        for k in downs:  # one downstream site per chunk, so a pass stops as early as it can
            rows = sorted([(k, g, f) for g, f in selected[k]], key=lambda r: r[2] < 0)  # error rows last
            for lo in range(0, len(rows), K):
                if progress:
                    progress(f"edges into {k[0]}.{k[1]}: {lo}/{len(rows)}")
                out += chunk(hm, batch, dicts, s, selected, l, rows[lo:lo + K], ups)
    return out


class Rank1(NamedTuple):
    """Seeds of feature rows in closed form: row k is c[k,b,p]·v[k,:] (step 3)."""

    c: Tensor
    """[n,B,P]"""
    v: Tensor
    """[n,D]"""

    def dense(self) -> Tensor:
        """[n,B,P,D]"""
        return self.c[..., None] * self.v[:, None, None, :]


def _chunk(hm: HookedModel, batch: PromptBatch, dicts, s: NodeScores, selected, l: int,
           rows: list[Node], ups: list[Key]) -> list[Edge]:
    """Steps 2-5 for one chunk of downstream nodes of one site of layer l (features first)."""
    key = rows[0][0]
    ups = [u for u in ups if u in upstream(key)]
    if not ups:
        return []
    layer_keys = [k for k in (("resid", l), ("attn", l), ("transcoder", l)) if k in dicts]
    if key == ("resid", l + 1) and len(layer_keys) == 3 and l + 1 in s.resid:
        x = s.resid[l + 1].to(s.clean[ups[0]][0].dtype)
        parts = [p[0] if len(p) == 1 else p[0] + p[1] for _, p in _seeds(dicts[key], s, key, rows, x, x, True)]
        grads = {u: parts for u in ups}
    else:
        grads = _block_vjps(hm, batch, dicts, s, l, key, rows, ups, layer_keys)
    out: list[Edge] = []
    for u in ups:
        if grads[u] is not None:
            out += _weights(rows, u, grads[u], dicts[u], s, selected[u])
    return out


def _block_vjps(hm, batch: PromptBatch, dicts, s: NodeScores, l: int, key: Key, rows: list[Node],
                ups: list[Key], layer_keys: list[Key]) -> dict[Key, list[Tensor] | None]:
    """Steps 2-4 through block l: u -> ∂(row k's seed · its site)/∂δ_u for the rows in order, as
    consecutive slices [n,B,P,D] (the seed chunks of ``_vjp``)."""
    ref = s.clean[ups[0]][0]
    B, P = batch.input_ids.shape
    deltas = {u: torch.zeros(B, P, s.clean[u][1].shape[-1], dtype=ref.dtype, device=ref.device,
                             requires_grad=True) for u in ups}
    captured: dict[Key, tuple[Tensor, Tensor]] = {}

    def freeze(k: Key, x_in: Tensor, x_out: Tensor) -> Tensor:
        if k == key:
            captured[k] = (x_in, x_out)
            raise _Captured
        y = x_out.detach()
        return y + deltas[k].to(y.dtype) if k in deltas else y

    nxt = ("resid", l + 1)
    try:
        run = hm.run(batch.input_ids, batch.attention_mask, edit=splice_edits(layer_keys, freeze),
                     read=[Site("resid_post", l)] if key == nxt else [], start_at=l, start_resid=s.resid[l],
                     stop_after=l, grad=True)
    except _Captured:
        run = None
    if key == nxt:
        x = run.acts[Site("resid_post", l)]
        captured[key] = (x, x)
    x_in, x_out = captured[key]
    inputs = [deltas[u] for u in ups]
    per_part = [_vjp(outs, seeds, inputs) for outs, seeds in _seeds(dicts[key], s, key, rows, x_in, x_out)]
    return {u: None if any(p[i] is None for p in per_part) else [g for p in per_part for g in p[i]]
            for i, u in enumerate(ups)}


def _seeds(d, s: NodeScores, key: Key, rows: list[Node], x_in: Tensor, x_out: Tensor, rank1: bool = False) -> list:
    """Step 3: [(outputs, seeds)] for the feature rows, then the error rows of ``rows``; each seed
    [n,B,P,D] in its output's dtype (feature rows: ``Rank1`` where closed form and ``rank1``);
    when x_in is x_out the two seeds of an error row are to be added."""
    gidx = s.groups.index  # [B,P]
    ga, ge = s.grads[key]
    feat = [(g, f) for _, g, f in rows if f >= 0]
    err = [g for _, g, f in rows if f < 0]
    assert [f >= 0 for _, _, f in rows] == [True] * len(feat) + [False] * len(err), "features first"
    parts = []
    if feat:
        G = torch.tensor([g for g, _ in feat], device=gidx.device)
        Fs = torch.tensor([f for _, f in feat], device=gidx.device)
        w = ga[..., Fs].permute(2, 0, 1) * (gidx[None] == G[:, None, None])  # [n,B,P]
        sd = feature_seeds(d, x_in.detach(), Fs, w)
        if isinstance(sd, Rank1):
            sd = Rank1(sd.c.to(x_in.dtype), sd.v.to(x_in.dtype)) if rank1 else sd.dense().to(x_in.dtype)
        parts.append(([x_in], [sd]))
    if err:
        G = torch.tensor(err, device=gidx.device)
        g_out = ge[None] * (gidx[None] == G[:, None, None])[..., None]  # [m,B,P,D_out]
        x = x_in.detach().requires_grad_()
        r = d.decode(d.encode(x))
        g_in = torch.autograd.grad(r, x, -g_out.to(r.dtype), is_grads_batched=True)[0]
        parts.append(([x_in, x_out], [g_in.to(x_in.dtype), g_out.to(x_out.dtype)]))
    return parts


_CLOSED_FORM = (StandardSAE, JumpReLUSAE, GatedSAE, TopKSAE)


def feature_seeds(d, x: Tensor, Fs: Tensor, w: Tensor) -> Rank1 | Tensor:
    """w[k]·∂a_{Fs[k]}/∂x at x [B,P,D_in], w [n,B,P] (step 3), in d's dtype: ``Rank1`` for the
    dictionary classes of step 3, else [n,B,P,D_in] by autograd."""
    cols, where = torch.unique(Fs, return_inverse=True)
    if type(d) in _CLOSED_FORM:
        with torch.no_grad():
            on = (encode_cols(d, x, cols) > 0)[..., where].permute(2, 0, 1)  # [n,B,P]
            W = d.W_enc[:, cols] * torch.exp(d.r_mag[cols]) if isinstance(d, GatedSAE) else d.W_enc[:, cols]
            return Rank1(w.to(W.dtype) * on, W.T[where])
    xg = x.requires_grad_()
    a = encode_cols(d, xg, cols)  # [B,P,U]
    seed = torch.zeros(len(Fs), *a.shape, dtype=a.dtype, device=a.device)  # [n,B,P,U]
    seed[torch.arange(len(Fs)), :, :, where] = w.to(a.dtype)
    return torch.autograd.grad(a, xg, seed, is_grads_batched=True)[0]


_CPU_SEED_BYTES = 5 << 19
"""On a CPU the seeds of one batched backward are limited to about this many bytes per output
(8 toy-icl seeds): the backward is memory-bound there and runs fastest while its tensors stay in
cache (measured: 8 seeds 1.5 s, 120 seeds at once 2.8 s, one backward per seed 1.6 s, for 120
attn nodes; benchmarks/circuit_edges.py). Elsewhere all seeds go at once."""


def _vjp(outs: list[Tensor], seeds: list[Tensor], inputs: list[Tensor]) -> list[list[Tensor] | None]:
    """Step 4: per input Σ_o seeds[o][k]·∂outs[o]/∂input for each of the n seeds, as consecutive
    slices [n_i,...] (not concatenated: step 5 reads each while it is in cache)."""
    if len(outs) == 2 and outs[0] is outs[1]:
        outs, seeds = outs[:1], [seeds[0] + seeds[1]]
    n = len(seeds[0])
    step = n
    if outs[0].device.type == "cpu":
        step = max(1, _CPU_SEED_BYTES // max(o[0].numel() * o.element_size() for o in seeds))
    res = []
    for lo in range(0, n, step):
        part = [g[lo:lo + step] for g in seeds]
        try:
            res.append(torch.autograd.grad(outs, inputs, part, retain_graph=True, allow_unused=True,
                                           is_grads_batched=True))
        except RuntimeError:  # a batching rule is missing: one backward per seed
            per = [torch.autograd.grad(outs, inputs, [g[k] for g in part], retain_graph=True, allow_unused=True)
                   for k in range(len(part[0]))]
            res.append([None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(inputs))])
    return [None if res[0][i] is None else [r[i] for r in res] for i in range(len(inputs))]


def _weights(rows: list[Node], u: Key, parts: list, d, s: NodeScores, sel: Sequence[tuple[int, int]]) -> list[Edge]:
    """Step 5: edges from the selected nodes of site u into ``rows``; parts: ∂/∂δ_u of the rows in
    order, each [n,B,P,D] or ``Rank1``; exact zeros (no path) are dropped."""
    a_u, e_u = s.clean[u]
    dt, D = a_u.dtype, e_u.shape[-1]
    gidx = s.groups.index.reshape(-1)  # [BP]
    srcs: list[Node] = []
    targets = []  # (tokens T of the group, diff [T,S] = (a_u − a′_u) there, W_dec rows [S,D])
    by_group: dict[int, list[int]] = {}
    for g, f in sel:
        if f >= 0:
            by_group.setdefault(g, []).append(f)
    a = a_u.reshape(-1, a_u.shape[-1])
    for g, fs in by_group.items():
        T = (gidx == g).nonzero().squeeze(1)
        Fs = torch.tensor(fs, device=a.device)
        targets.append((T, a[T[:, None], Fs] - s.base.a[u][g, Fs], d.W_dec[Fs].to(dt)))
        srcs += [(u, g, f) for f in fs]
    errs = [g for g, f in sel if f < 0]
    if errs:
        diff_e = (e_u - s.groups.expand(s.base.e[u])).reshape(-1, D)  # [BP,D]
        onehot = s.groups.onehot(dt).reshape(-1, s.groups.n)[:, errs]  # [BP,m]
        srcs += [(u, g, -1) for g in errs]
    if not srcs:
        return []
    ws = []
    for p in parts:
        cols = []
        if isinstance(p, Rank1):  # Σ_t c[k,t]·diff[t,s] times v_k·W[s]
            c, v = p.c.to(dt).reshape(len(p.c), -1), p.v.to(dt)  # [n,BP], [n,D]
            cols += [(c[:, T] @ diff) * (v @ W.T) for T, diff, W in targets]
            if errs:
                cols.append((c * (diff_e @ v.T).T) @ onehot)
        else:
            gd = p.to(dt).reshape(len(p), -1, D)  # [n,BP,D]
            cols += [((gd[:, T] @ W.T) * diff).sum(1) for T, diff, W in targets]
            if errs:
                cols.append((gd * diff_e).sum(-1) @ onehot)
        ws.append(torch.cat(cols, 1))
    w = torch.cat(ws).detach().cpu().tolist()
    return [Edge(src, dst, wk[i]) for dst, wk in zip(rows, w) for i, src in enumerate(srcs) if wk[i] != 0.0]
