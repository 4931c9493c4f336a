"""Edges between the nodes of consecutive sites (SPEC §7; Marks et al. 2024, §2.2, appendix on
edge attribution), many downstream nodes per backward pass.

Consecutive sites: resid[l] → attn[l], resid[l] → transcoder[l], attn[l] → transcoder[l], and
resid[l], attn[l], transcoder[l] → resid[l+1]; the paths through an intermediate site are held
fixed (resid[l] → transcoder[l] is the direct path only; Marks et al. stop gradients there too).

1. edge(u → d) = Σ_{tokens p of d's group} Σ_{tokens q of u's group}
                 ∂m/∂a_d[p] · ∂a_d[p]/∂a_u[q] · (a_u[q] − a′_u[q]),
   with ∂m/∂a_d from the clean pass; for an error node read e, ∂m/∂e and ⟨·,·⟩ over d_model.
2. A pass runs block l only (start_at = l, from the clean resid_pre[l]) and stops once the
   downstream site is reached. Every site of layer l is frozen: it writes x_out.detach() + δ_u,
   where δ_u [R,P,D] is a zero leaf, so ∂/∂δ_u is the gradient at that site's output and
   ∂/∂a_u = ∂/∂δ_u · W_dec,uᵀ. Downstream a_d = encode(x_in) is computed from the live input.
   Into resid[l+1] no pass is needed: with block l frozen, resid_pre[l+1] = clean + Σ_u δ_u.
3. Batched seeds: the prompt batch (B rows) is tiled K times, one copy per downstream node; the
   objective Σ_k Σ_p w_k[p]·a_d(k)[copy k, p, f_k] with w_k = ∂m/∂a_d[·, f_k] on k's group gives,
   in one backward, each copy's vector-Jacobian product (rows never interact). Feature rows
   encode only the columns the chunk needs (top-k dictionaries: all columns).
4. Edge weights for the selected upstream nodes: group sums of (∂/∂a_u)·(a_u − a′_u).
``per_node=True`` runs one backward per downstream node (K = 1): the reference and the benchmark.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from icl_cli.circuit.attribution import NodeScores
from icl_cli.circuit.splice import Key, repeat_batch, splice_edits
from icl_cli.core.batch import PromptBatch
from icl_cli.core.sites import HookedModel, Site

Node = tuple[Key, int, int]
"""(key, group index, feature or -1 for the error node)."""


class Edge(NamedTuple):
    src: Node
    dst: Node
    weight: float


def upstream(key: Key) -> list[Key]:
    """The sites whose nodes feed ``key``'s nodes directly (consecutive sites)."""
    kind, l = key
    if kind == "attn":
        return [("resid", l)]
    if kind == "transcoder":
        return [("resid", l), ("attn", l)]
    return [("resid", l - 1), ("attn", l - 1), ("transcoder", l - 1)] if l > 0 else []


class _Encoder(nn.Module):
    def __init__(self, d: nn.Module):
        super().__init__()
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        return self.d.encode(x)


def encode_cols(d, x: Tensor, cols: Tensor) -> Tensor:
    """encode(x)[..., cols] computing only those columns when features are independent."""
    if d.cfg.arch == "topk":
        return d.encode(x)[..., cols]
    F = d.cfg.d_sae
    sliced = {}
    for name, p in [*d.named_parameters(), *d.named_buffers()]:
        if name == "W_enc":
            sliced["d." + name] = p[:, cols]
        elif name not in ("W_dec", "b_dec") and p.dim() == 1 and p.shape[0] == F:
            sliced["d." + name] = p[cols]
    return torch.func.functional_call(_Encoder(d), sliced, (x,), strict=False)


def edges(hm: HookedModel, batch: PromptBatch, dicts: Mapping[Key, object], s: NodeScores,
          selected: Mapping[Key, Sequence[tuple[int, int]]], max_rows: int = 256, per_node: bool = False,
          progress: Callable[[str], None] | None = None) -> list[Edge]:
    """Every edge between selected nodes of consecutive sites. selected: key -> [(group, feature)]."""
    B = len(batch)
    K = 1 if per_node else max(1, max_rows // max(B, 1))
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
                out += _chunk(hm, batch, dicts, s, selected, l, rows[lo:lo + K], ups)
    return out


class _Captured(Exception):
    """Leaves a pass once the downstream site's input and output are known."""


def _chunk(hm: HookedModel, batch: PromptBatch, dicts, s: NodeScores, selected, l: int,
           rows: list[Node], ups: list[Key]) -> list[Edge]:
    """Steps 2-4 for one chunk of downstream nodes of layer l (one forward, one backward)."""
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
