"""Training-time encoder and decoder with hand-written backward passes that skip inactive features.

A ReLU-family dictionary (standard, gated, JumpReLU) computes one dense product, the encoder's
pre-activations pre = x' @ W_enc (+ b_enc) [B, d_sae]. Everything after it only involves the
entries S where a feature can be active (pre > thr): the activation is zero elsewhere and so is
the gradient reaching the encoder there. `encode` therefore returns the batch's codes either

* sparse, when |S| ≤ SPARSE_MAX_DENSITY · B · d_sae (a trained dictionary: L0 ≪ d_sae): the
  values at S [nnz] with their (row, col) pattern. The decoder is an `embedding_bag` over the
  active rows of W_dec; backward gives ∂L/∂vals as a sampled product ⟨g[row], W_dec[col]⟩ and
  ∂L/∂W_dec = Aᵀ g, ∂L/∂W_enc = x'ᵀ G as sparse-dense products (B·nnz·d work, not B·d_sae·d);
* dense [B, d_sae] otherwise (a fresh dictionary: half its features fire), with a backward that
  still skips the [B, d_in] input gradient nobody needs: ∂L/∂b_dec from the centring x' = x − b_dec
  is −W_enc @ Σ_b ∂L/∂pre_b, a matrix-vector product instead of a [B, d_sae] @ [d_sae, d_in] one.

Both forms give the loss and gradients of the plain formulas (tests/dictionaries/
test_fast_backward.py compares them with autograd of the dense formulas). The sparse form runs on
CPU in float32/float64 only; elsewhere `encode` returns the dense form.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SPARSE_MAX_DENSITY = 0.1
"""Above this fraction of active entries the dense products are faster (measured on CPU)."""


def _csr(crow: Tensor, col: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=False)


def _nonzero(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(row, col) of the true entries of a [B, F] bool mask, row-major, as ``mask.nonzero()``.

    At a trained density (≈1% true) ``nonzero`` over the whole [B, F] is the slowest part of a
    sparse step after the encoder product. Read as 8-byte words, the mask has 8× fewer entries and
    most words are zero: ``nonzero`` over the words, then over the 8 bytes of each nonzero word
    (3× faster on CPU at B 2048, F 4096, L0 32; same order: words row-major, bytes in order)."""
    B, n_feat = mask.shape
    if n_feat % 8 or not mask.is_contiguous() or mask.dtype != torch.bool:
        return mask.nonzero().unbind(1)
    words = mask.view(torch.int64)  # [B, F / 8]: a bool is one byte
    wr, wc = (words != 0).nonzero().unbind(1)
    i, k = mask.view(B, n_feat // 8, 8)[wr, wc].nonzero().unbind(1)  # [n_words, 8] -> (word, byte)
    return wr[i], wc[i] * 8 + k


@dataclass
class Pattern:
    """Positions of the S entries of a [B, F] matrix, row-major, with a column-major view."""

    row: Tensor
    """[nnz] int64 row (token) of each entry, non-decreasing."""
    col: Tensor
    """[nnz] int64 column (feature) of each entry."""
    crow: Tensor
    """[B+1] CSR row pointers."""
    perm: Tensor
    """[nnz] order that sorts the entries by column (stable)."""
    ccol: Tensor
    """[F+1] pointers of the column-sorted entries (CSR of the transpose)."""
    shape: tuple[int, int]

    @classmethod
    def of(cls, mask: Tensor) -> "Pattern":
        B, n_feat = mask.shape
        row, col = _nonzero(mask)
        crow = torch.zeros(B + 1, dtype=torch.long, device=mask.device)
        torch.cumsum(torch.bincount(row, minlength=B), 0, out=crow[1:])
        ccol = torch.zeros(n_feat + 1, dtype=torch.long, device=mask.device)
        torch.cumsum(torch.bincount(col, minlength=n_feat), 0, out=ccol[1:])
        return cls(row, col, crow, torch.argsort(col, stable=True), ccol, (B, n_feat))

    @classmethod
    def of_rows(cls, idx: Tensor, n_feat: int) -> "Pattern":
        """The pattern of k entries per row at columns idx [B, k] (top-k), in that order."""
        B, k = idx.shape
        col = idx.reshape(-1)
        row = torch.arange(B, device=idx.device).repeat_interleave(k)
        crow = torch.arange(0, B * k + 1, k, device=idx.device)
        ccol = torch.zeros(n_feat + 1, dtype=torch.long, device=idx.device)
        torch.cumsum(torch.bincount(col, minlength=n_feat), 0, out=ccol[1:])
        return cls(row, col, crow, torch.argsort(col, stable=True), ccol, (B, n_feat))

    def rows_times(self, vals: Tensor, dense: Tensor) -> Tensor:
        """M @ dense for M [B, F] holding `vals` at the pattern; dense [F, d] -> [B, d]."""
        return torch.mm(_csr(self.crow, self.col, vals, self.shape), dense)

    def t_times(self, vals: Tensor, dense: Tensor) -> Tensor:
        """Mᵀ @ dense for M [B, F] holding `vals` at the pattern; dense [B, d] -> [F, d]."""
        B, n_feat = self.shape
        return torch.mm(_csr(self.ccol, self.row[self.perm], vals[self.perm], (n_feat, B)), dense)

    def sampled_dot(self, g: Tensor, W: Tensor) -> Tensor:
        """[nnz] ⟨g[row], W[col]⟩ for g [B, d], W [F, d] (a sampled dense-dense product)."""
        zeros = torch.zeros(len(self.col), dtype=g.dtype, device=g.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse.sampled_addmm(_csr(self.crow, self.col, zeros, self.shape), g, W.T, beta=0.0).values()


@dataclass
class Codes:
    """A batch's codes: dense [B, F] (`pattern` None) or the entries at `pattern`."""

    pre: Tensor
    """Pre-activations: [B, F] dense, or [nnz] at the pattern."""
    pattern: Pattern | None
    batch: int
    selected: Tensor | None = None
    """[B, F] bool, the entries pre > thr, when computed (always on CPU)."""

    def feature_sum(self, a: Tensor) -> Tensor:
        """[F] Σ_b a[b, i] of values laid out like `pre` (one pass over a dense [B, F])."""
        if self.pattern is None:
            return a.sum(0)
        return torch.zeros(self.pattern.shape[1], dtype=a.dtype, device=a.device).index_add(0, self.pattern.col, a)

    def feature(self, p: Tensor) -> Tensor:
        """A per-feature vector [F] laid out like `pre` ([F], broadcasting, or [nnz])."""
        return p if self.pattern is None else p[self.pattern.col]

    def decode(self, a: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
        """[B, d_out] = A @ W_dec + b_dec for the codes' activations a (laid out like `pre`)."""
        if self.pattern is None:
            return torch.addmm(b_dec, a, W_dec)
        return _SparseDecode.apply(a, W_dec, self.pattern) + b_dec

    def fired(self, on: Tensor) -> Tensor:
        """[B, F] bool from a mask laid out like `pre`."""
        if self.pattern is None:
            return on
        p = self.pattern
        out = torch.zeros(p.shape, dtype=torch.bool, device=on.device)
        out.view(-1)[p.row[on] * p.shape[1] + p.col[on]] = True
        return out


def encode(x: Tensor, b_in: Tensor | None, W_enc: Tensor, b_enc: Tensor | None, thr: Tensor | float) -> Codes:
    """pre = (x − b_in) @ W_enc + b_enc as Codes, sparse at S = {x'W_enc > thr − b_enc} when S is small.

    x [B, d_in]; b_in [d_in] or None (no centring); W_enc [d_in, F]; b_enc [F] or None; thr a
    float or [F]. With thr = 0 the set is exactly {pre > 0} (a rounded sum keeps the sign of the
    exact one), so the bias is added on the selected entries only. Gradients reach x, b_in, W_enc
    and b_enc as in autograd of the formula; in the sparse form they are exact only if the loss
    does not depend on pre outside S.
    """
    with torch.no_grad():
        xin = x - b_in if b_in is not None else x
        proj = torch.mm(xin, W_enc)  # [B, F], the one dense product
        sparse_ok = proj.device.type == "cpu" and proj.dtype in (torch.float32, torch.float64)
        mask = None
        if sparse_ok:
            mask = proj > (thr - b_enc if b_enc is not None else thr)
            sparse_ok = int(torch.count_nonzero(mask)) <= SPARSE_MAX_DENSITY * mask.numel()
        if not sparse_ok and b_enc is not None:  # in place unless autocast made proj bfloat16
            proj = proj.add_(b_enc) if proj.dtype == b_enc.dtype else proj + b_enc
    if not sparse_ok:
        return Codes(_DenseEncode.apply(proj, xin, x, b_in, W_enc, b_enc), None, x.shape[0], mask)
    pat = Pattern.of(mask)
    return Codes(_SparseEncode.apply(proj, xin, x, b_in, W_enc, b_enc, pat), pat, x.shape[0], mask)


def _input_grads(ctx, g_pre_sum: Tensor, W_enc: Tensor, g_x_fn) -> tuple:
    """(∂/∂x, ∂/∂b_in) from Σ_b ∂L/∂pre_b [F] (b_in) and a thunk for the full input gradient."""
    need_x, need_b_in = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    g_x = g_x_fn() if need_x else None
    g_b_in = -(W_enc @ g_pre_sum) if need_b_in else None
    return g_x, g_b_in


class _DenseEncode(torch.autograd.Function):
    """Attach the encoder's gradients to precomputed dense pre-activations [B, F]."""

    @staticmethod
    def forward(ctx, pre, xin, x, b_in, W_enc, b_enc):
        ctx.save_for_backward(xin, W_enc)
        ctx.has_b_enc = b_enc is not None
        return pre

    @staticmethod
    def backward(ctx, g):
        xin, W_enc = ctx.saved_tensors
        g = g.to(W_enc.dtype)  # under autocast pre (and so g) may be bfloat16
        g_sum = g.sum(0)
        g_x, g_b_in = _input_grads(ctx, g_sum, W_enc, lambda: g @ W_enc.T)
        g_W = xin.to(g.dtype).T @ g if ctx.needs_input_grad[4] else None
        return None, None, g_x, g_b_in, g_W, g_sum if ctx.has_b_enc else None


class _SparseEncode(torch.autograd.Function):
    """pre = proj + b_enc at a pattern [nnz] from the precomputed proj = x'W_enc [B, F], with the
    encoder's gradients as sparse-dense products: ∂L/∂W_enc = x'ᵀ G = (Gᵀ x')ᵀ, G [B, F] nonzero
    only at the pattern."""

    @staticmethod
    def forward(ctx, proj, xin, x, b_in, W_enc, b_enc, pat: Pattern):
        ctx.save_for_backward(xin, W_enc)
        ctx.pat, ctx.has_b_enc = pat, b_enc is not None
        vals = torch.take(proj, pat.row * pat.shape[1] + pat.col)  # far faster than proj[row, col]
        return vals.add_(b_enc[pat.col]) if b_enc is not None else vals

    @staticmethod
    def backward(ctx, g):
        xin, W_enc = ctx.saved_tensors
        pat: Pattern = ctx.pat
        g_sum = torch.zeros(pat.shape[1], dtype=g.dtype, device=g.device).index_add_(0, pat.col, g)
        g_x, g_b_in = _input_grads(ctx, g_sum, W_enc, lambda: pat.rows_times(g, W_enc.T.contiguous()))
        g_W = pat.t_times(g, xin).T if ctx.needs_input_grad[4] else None
        return None, None, g_x, g_b_in, g_W, g_sum if ctx.has_b_enc else None, None


class _SparseDecode(torch.autograd.Function):
    """(a [nnz] at a pattern of a [B, F] matrix A, W_dec [F, d]) -> A @ W_dec [B, d]."""

    @staticmethod
    def forward(ctx, a, W_dec, pat: Pattern):
        ctx.save_for_backward(a, W_dec)
        ctx.pat = pat
        return F.embedding_bag(pat.col, W_dec, pat.crow[:-1], mode="sum", per_sample_weights=a)

    @staticmethod
    def backward(ctx, g):
        a, W_dec = ctx.saved_tensors
        pat: Pattern = ctx.pat
        g = g.contiguous()
        g_a = pat.sampled_dot(g, W_dec) if ctx.needs_input_grad[0] else None
        g_W = pat.t_times(a, g) if ctx.needs_input_grad[1] else None
        return g_a, g_W, None
