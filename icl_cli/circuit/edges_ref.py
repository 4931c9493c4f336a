"""Reference edges (SPEC §7): the prompt batch tiled K times, one copy per downstream node, one
forward and one backward through block l; K = 1 is one backward per downstream node.

This is the direct form of the formula in edges.py (steps 1-4 there) with autograd through every
downstream encoder; ``edges(method="tiled" | "per-node")`` runs it, the tests and
benchmarks/circuit_edges.py compare the batched path of edges.py with it.

3'. Tiled seeds: the objective Σ_k Σ_p w_k[p]·a_d(k)[copy k, p, f_k] with w_k = ∂m/∂a_d[·, f_k]
    on k's group gives, in one backward, each copy's vector-Jacobian product (rows never
    interact). Feature rows encode only the columns the chunk needs (top-k: all columns).
"""

from __future__ import annotations

import torch
from torch import Tensor

from icl_cli.circuit.attribution import NodeScores
from icl_cli.circuit.edge_types import Captured as _Captured, Edge, Node, encode_cols, upstream
from icl_cli.circuit.splice import Key, repeat_batch, splice_edits
from icl_cli.core.batch import PromptBatch
from icl_cli.core.sites import HookedModel, Site


def tiled_chunk(hm: HookedModel, batch: PromptBatch, dicts, s: NodeScores, selected, l: int,
                rows: list[Node], ups: list[Key]) -> list[Edge]:
    """Steps 2-4 (edges.py) for one chunk of downstream nodes of layer l (one forward, one backward)."""
    K, B, P = len(rows), len(batch), batch.input_ids.shape[1]
    ref = s.clean[ups[0]][0]
    deltas: dict[Key, Tensor] = {}
    down_keys = {k for k, _, _ in rows}
    captured: dict[Key, tuple[Tensor, Tensor]] = {}

    def freeze(key: Key, x_in: Tensor, x_out: Tensor) -> Tensor:
        if key in down_keys:
            captured[key] = (x_in, x_out)
            raise _Captured
        y = x_out.detach()
        return y + deltas[key].to(y.dtype) if key in deltas else y

    layer_keys = [k for k in (("resid", l), ("attn", l), ("transcoder", l)) if k in dicts]
    nxt = ("resid", l + 1)
    if down_keys == {nxt} and len(layer_keys) == 3 and l + 1 in s.resid:
        # every site of block l is frozen, so resid_pre[l+1] = its clean value + Σ_u δ_u: no pass,
        # and ∂/∂δ_u is the same for every u — the VJPs of the downstream encoder, one per row
        gx = _resid_vjps(dicts[nxt], s, nxt, rows, s.resid[l + 1].to(ref.dtype))
        grads = [gx] * len(ups)
    else:
        deltas.update({u: torch.zeros(K * B, P, s.clean[u][1].shape[-1], dtype=ref.dtype, device=ref.device,
                                      requires_grad=True) for u in ups})
        grads = _block_vjps(hm, repeat_batch(batch, K), dicts, s, l, rows, ups, layer_keys, deltas, freeze, captured)

    onehot = s.groups.onehot(ref.dtype)  # [B,P,G]
    result: list[Edge] = []
    for u, gd in zip(ups, grads):
        if gd is None:
            continue
        gd = gd.reshape(K, B, P, -1).to(ref.dtype)
        a_u, e_u = s.clean[u]
        feats = [(g, f) for g, f in selected[u] if f >= 0]
        errs = [g for g, f in selected[u] if f < 0]
        if feats:
            G = torch.tensor([g for g, _ in feats], device=ref.device)
            Fs = torch.tensor([f for _, f in feats], device=ref.device)
            W = dicts[u].W_dec[Fs].to(ref.dtype)  # [S,D]
            diff = (a_u - s.groups.expand(s.base.a[u]))[..., Fs]  # [B,P,S]
            val = torch.einsum("kbps,bpg->kgs", (gd @ W.T) * diff, onehot)  # [K,G,S]
            w = val[:, G, torch.arange(len(feats), device=ref.device)]  # [K,S]
            result += _collect(rows, [(u, g, f) for g, f in feats], w)
        if errs:
            G = torch.tensor(errs, device=ref.device)
            diff = e_u - s.groups.expand(s.base.e[u])  # [B,P,D]
            val = torch.einsum("kbp,bpg->kg", (gd * diff).sum(-1), onehot)  # [K,G]
            result += _collect(rows, [(u, g, -1) for g in errs], val[:, G])
    return result


def _collect(rows: list[Node], srcs: list[Node], w: Tensor) -> list[Edge]:
    """Edges from ``srcs`` (one site) to the chunk's rows that it feeds directly; exact zeros
    (no path) are dropped."""
    w = w.detach().cpu().tolist()
    return [Edge(src, dst, wk[i]) for dst, wk in zip(rows, w) if srcs[0][0] in upstream(dst[0])
            for i, src in enumerate(srcs) if wk[i] != 0.0]


def _block_vjps(hm, rb, dicts, s: NodeScores, l: int, rows: list[Node], ups: list[Key], layer_keys, deltas,
                freeze, captured) -> list:
    """Steps 2-3 through block l: one tiled pass, one backward of Σ_k (seed_k · node_k)."""
    K, B, P = len(rows), len(rb) // len(rows), rb.input_ids.shape[1]
    ref = s.clean[ups[0]][0]
    down_keys = {k for k, _, _ in rows}
    nxt = ("resid", l + 1)
    try:
        run = hm.run(rb.input_ids, rb.attention_mask, edit=splice_edits(layer_keys, freeze),
                     read=[Site("resid_post", l)] if nxt in down_keys else [], start_at=l,
                     start_resid=s.resid[l].repeat(K, 1, 1), stop_after=l, grad=True)
    except _Captured:
        run = None
    if nxt in down_keys:
        x = run.acts[Site("resid_post", l)]
        captured[nxt] = (x, x)

    gidx = s.groups.index  # [B,P]
    objective = ref.new_zeros(())
    for key in down_keys:
        d = dicts[key]
        x_in, x_out = (t.reshape(K, B, P, -1) for t in captured[key])
        ga, ge = s.grads[key]
        feat = [(j, g, f) for j, (k, g, f) in enumerate(rows) if k == key and f >= 0]
        err = [(j, g) for j, (k, g, f) in enumerate(rows) if k == key and f < 0]
        if feat:
            J = torch.tensor([j for j, _, _ in feat], device=ref.device)
            G = torch.tensor([g for _, g, _ in feat], device=ref.device)
            Fs = torch.tensor([f for _, _, f in feat], device=ref.device)
            cols, where = torch.unique(Fs, return_inverse=True)
            a = encode_cols(d, x_in[J], cols)  # [n,B,P,U]
            a = a.gather(-1, where[:, None, None, None].expand(-1, B, P, 1)).squeeze(-1)  # [n,B,P]
            w = ga[..., Fs].permute(2, 0, 1) * (gidx[None] == G[:, None, None])  # [n,B,P]
            objective = objective + (a * w).sum()
        if err:
            J = torch.tensor([j for j, _ in err], device=ref.device)
            G = torch.tensor([g for _, g in err], device=ref.device)
            xi, xo = x_in[J], x_out[J]
            e = xo.to(ref.dtype) - d.decode(d.encode(xi))  # [n,B,P,D]
            w = ge[None] * (gidx[None] == G[:, None, None])[..., None]
            objective = objective + (e * w).sum()
    return torch.autograd.grad(objective, [deltas[u] for u in ups], allow_unused=True)


def _resid_vjps(d, s: NodeScores, key: Key, rows: list[Node], x0: Tensor) -> Tensor:
    """[K,B,P,D]: for each row, w·∂(node)/∂x at x0 (resid_pre[l+1]), batched over rows."""
    x = x0.detach().requires_grad_()
    gidx = s.groups.index
    ga, ge = s.grads[key]
    out = torch.zeros(len(rows), *x0.shape, dtype=x0.dtype, device=x0.device)
    feat = [(j, g, f) for j, (_, g, f) in enumerate(rows) if f >= 0]
    err = [(j, g) for j, (_, g, f) in enumerate(rows) if f < 0]
    if feat:
        J = torch.tensor([j for j, _, _ in feat], device=x0.device)
        G = torch.tensor([g for _, g, _ in feat], device=x0.device)
        Fs = torch.tensor([f for _, _, f in feat], device=x0.device)
        cols, where = torch.unique(Fs, return_inverse=True)
        a = encode_cols(d, x, cols)  # [B,P,U]
        seed = torch.zeros(len(feat), *a.shape, dtype=a.dtype, device=a.device)  # [n,B,P,U]
        w = ga[..., Fs].permute(2, 0, 1) * (gidx[None] == G[:, None, None])  # [n,B,P]
        seed[torch.arange(len(feat)), :, :, where] = w
        out[J] = torch.autograd.grad(a, x, seed, retain_graph=bool(err), is_grads_batched=True)[0].to(out.dtype)
    if err:
        J = torch.tensor([j for j, _ in err], device=x0.device)
        G = torch.tensor([g for _, g in err], device=x0.device)
        e = x.to(ge.dtype) - d.decode(d.encode(x))  # [B,P,D]
        seed = ge[None] * (gidx[None] == G[:, None, None])[..., None]  # [m,B,P,D]
        out[J] = torch.autograd.grad(e, x, seed, is_grads_batched=True)[0].to(out.dtype)
    return out
