"""Top-k SAE (Gao et al. 2024) with sparse decoding and the AuxK loss for dead features.

    pre = (x - b_dec) @ W_enc + b_enc
    a   = relu of the k largest entries of pre, zero elsewhere
    L   = ‖t − x̂‖² + α·‖e − ê_dead‖²   (e = t − x̂; ê_dead reconstructs e from the top k_aux
                                        pre-activations of dead features; α = 1/32, k_aux = d_in/2)

Training never materialises the dense [B, d_sae] activations after the top-k: the decoder is an
`embedding_bag` over the k chosen rows of W_dec; in the backward pass the weight gradients are
sparse-dense products (B·k·d work instead of B·d_sae·d) and the gradient of the k values is a
sampled dense-dense product (SDDMM). Only the encoder's forward matmul stays dense.
"""

from __future__ import annotations

import torch
from torch import Tensor

from icl_cli.dictionaries.base import Dictionary, LossParts, mse_sum, register
from icl_cli.dictionaries.sparse_train import Pattern, _SparseDecode

AUXK_COEFF = 1 / 32


class _TopKEncode(torch.autograd.Function):
    """(x [B,d_in], b_in [d_in] or None, W_enc [d_in,d_sae], b_enc [d_sae], k) -> (vals [B,k], idx [B,k]).

    vals are the raw top-k pre-activations (relu is applied outside, so its mask enters the
    gradient there). Backward is sparse in d_sae: dL/dW_enc = x'ᵀ G with G [B, d_sae] holding k
    entries per row, computed as a sparse-dense product (Gᵀ x')ᵀ.
    """

    @staticmethod
    def forward(ctx, x: Tensor, b_in: Tensor | None, W_enc: Tensor, b_enc: Tensor, k: int):
        xin = x - b_in if b_in is not None else x
        pre = torch.addmm(b_enc, xin, W_enc)  # [B, d_sae]
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(xin, W_enc, idx)
        ctx.has_b_in = b_in is not None
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, g_vals: Tensor, _g_idx):
        xin, W_enc, idx = ctx.saved_tensors
        g = g_vals.to(W_enc.dtype).reshape(-1)
        pat = Pattern.of_rows(idx, W_enc.shape[1])
        g_b_enc = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=W_enc.device).index_add_(0, pat.col, g)
        g_W = pat.t_times(g, xin.to(W_enc.dtype)).T  # [d_in, d_sae]
        g_b_in = -(W_enc @ g_b_enc) if ctx.has_b_in else None  # x' = x − b_in, summed over the batch
        return None, g_b_in, g_W, g_b_enc, None


@register("topk")
class TopKSAE(Dictionary):
    renorm_decoder = True
    default_coeff = 0.0  # top-k needs no sparsity penalty

    def activate(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        """[B, k] values at [B, k] feature indices -> [B, d_out]."""
        pat = Pattern.of_rows(idx, self.cfg.d_sae)
        return _SparseDecode.apply(vals.to(self.W_dec.dtype).reshape(-1), self.W_dec, pat) + self.b_dec

    def training_loss(self, x: Tensor, target: Tensor, coeff: float, dead: Tensor | None = None) -> LossParts:
        b_in = self.b_dec if self.cfg.apply_b_dec_to_input else None
        vals, idx = _TopKEncode.apply(x.to(self.W_enc.dtype), b_in, self.W_enc, self.b_enc, self.cfg.k)
        vals = torch.relu(vals)
        recon = self.decode_sparse(vals, idx)
        mse = mse_sum(recon, target)
        fired = torch.zeros(x.shape[0], self.cfg.d_sae, dtype=torch.bool, device=x.device)
        fired.scatter_(1, idx, vals > 0)
        aux = self._auxk(x, target - recon.detach(), dead)
        zero = mse.new_zeros(())
        return LossParts(mse + aux, mse, zero, aux, fired, recon)

    def _auxk(self, x: Tensor, residual: Tensor, dead: Tensor | None) -> Tensor:
        """AuxK: dead features (top k_aux of their pre-activations) reconstruct the residual."""
        if dead is None or not bool(dead.any()):
            return residual.new_zeros(())
        dead_idx = dead.nonzero().squeeze(1)
        k_aux = min(self.cfg.d_in // 2, len(dead_idx))
        pre = self.sae_in(x) @ self.W_enc[:, dead_idx] + self.b_enc[dead_idx]  # [B, n_dead]
        vals, j = pre.topk(k_aux, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, j, torch.relu(vals))
        e_hat = acts @ self.W_dec[dead_idx]  # dense over the dead features only
        scale = min(len(dead_idx) / max(self.cfg.d_in // 2, 1), 1.0)
        return AUXK_COEFF * scale * mse_sum(e_hat, residual)

    def saelens_extra_cfg(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
