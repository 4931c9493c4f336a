"""Standard SAE: ReLU activation, L1 penalty weighted by decoder norm (Bricken et al. 2023).

    a = relu((x - b_dec) @ W_enc + b_enc)
    L = ‖t - x̂‖² + λ Σ_i a_i ‖W_dec[i]‖
"""

from __future__ import annotations

import torch
from torch import Tensor

from icl_cli.dictionaries import sparse_train
from icl_cli.dictionaries.base import Dictionary, LossParts, mse_sum, register


@register("standard")
class StandardSAE(Dictionary):
    default_coeff = 5.0

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_loss(self, x: Tensor, target: Tensor, coeff: float, dead: Tensor | None = None) -> LossParts:
        # only entries with pre > 0 matter: relu is 0 (and has gradient 0) elsewhere
        b_in = self.b_dec if self.cfg.apply_b_dec_to_input else None
        c = sparse_train.encode(x.to(self.W_enc.dtype), b_in, self.W_enc, self.b_enc, 0.0)
        a = torch.relu(c.pre)  # [B, d_sae], or [nnz] at the active entries
        recon = c.decode(a, self.W_dec, self.b_dec)
        mse = mse_sum(recon, target)
        # Σ_b Σ_i a_bi ‖W_dec[i]‖ / B, summed over the batch first (one pass over a dense [B, d_sae])
        sparsity = c.feature_sum(a) @ self.W_dec.norm(dim=1) / c.batch
        zero = mse.new_zeros(())
        fired = c.selected if c.pattern is None and c.selected is not None else c.fired(a > 0)  # both pre > 0
        return LossParts(mse + coeff * sparsity, mse, sparsity, zero, fired, recon)
