"""Standard SAE: ReLU activation, L1 penalty weighted by decoder norm (Bricken et al. 2023).

    a = relu((x - b_dec) @ W_enc + b_enc)
    L = ‖t - x̂‖² + λ Σ_i a_i ‖W_dec[i]‖
"""

from __future__ import annotations

import torch
from torch import Tensor

from icl_cli.dictionaries.base import Dictionary, LossParts, mse_sum, register


@register("standard")
class StandardSAE(Dictionary):
    default_coeff = 5.0

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_loss(self, x: Tensor, target: Tensor, coeff: float, dead: Tensor | None = None) -> LossParts:
        a = self.encode(x)  # [B, d_sae]
        recon = self.decode(a)
        mse = mse_sum(recon, target)
        sparsity = (a * self.W_dec.norm(dim=1)).sum(-1).mean()
        zero = mse.new_zeros(())
        return LossParts(mse + coeff * sparsity, mse, sparsity, zero, a > 0, recon)
