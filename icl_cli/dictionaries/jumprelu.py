"""JumpReLU SAE (Rajamanoharan et al. 2024b), trained with straight-through pseudo-gradients.

    pre = (x - b_dec) @ W_enc + b_enc
    a   = relu(pre) · [pre > θ]
    L   = ‖t − x̂‖² + λ Σ_i H(pre_i − θ_i)      (an L0 penalty)

The step H has zero gradient almost everywhere; the threshold θ receives the pseudo-gradient of
a rectangle kernel of width ε: ∂H(z−θ)/∂θ ≈ −(1/ε)·K((z−θ)/ε), and ∂(z·H(z−θ))/∂θ ≈
−(θ/ε)·K((z−θ)/ε), with K(u) = 1 on |u| < ½.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icl_cli.dictionaries.base import DictConfig, Dictionary, LossParts, mse_sum, register

BANDWIDTH = 1e-3
INIT_THRESHOLD = 1e-3


def _kernel(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor) -> Tensor:
        ctx.save_for_backward(pre, theta)
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, theta = ctx.saved_tensors
        g_pre = g * (pre > theta).to(g.dtype)
        g_theta = -(theta / BANDWIDTH) * _kernel((pre - theta) / BANDWIDTH) * g
        return g_pre, g_theta.reshape(-1, theta.shape[-1]).sum(0)


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor) -> Tensor:
        ctx.save_for_backward(pre, theta)
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, theta = ctx.saved_tensors
        g_theta = -(1.0 / BANDWIDTH) * _kernel((pre - theta) / BANDWIDTH) * g
        return None, g_theta.reshape(-1, theta.shape[-1]).sum(0)


@register("jumprelu")
class JumpReLUSAE(Dictionary):
    renorm_decoder = True
    default_coeff = 0.05

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), INIT_THRESHOLD, dtype=self.W_enc.dtype))

    @torch.no_grad()
    def reinit_features(self, idx: Tensor, directions: Tensor, enc_norm: float) -> None:
        super().reinit_features(idx, directions, enc_norm)
        self.threshold[idx] = INIT_THRESHOLD

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def training_loss(self, x: Tensor, target: Tensor, coeff: float, dead: Tensor | None = None) -> LossParts:
        pre = self.encode_pre(x)
        a = _JumpReLU.apply(torch.relu(pre), self.threshold)
        recon = self.decode(a)
        mse = mse_sum(recon, target)
        sparsity = _Step.apply(pre, self.threshold).sum(-1).mean()
        zero = mse.new_zeros(())
        return LossParts(mse + coeff * sparsity, mse, sparsity, zero, a > 0, recon)

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        self.threshold.clamp_(min=1e-6)
