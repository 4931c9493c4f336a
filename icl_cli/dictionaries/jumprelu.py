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

from icl_cli.dictionaries import sparse_train
from icl_cli.dictionaries.base import DictConfig, Dictionary, LossParts, mse_sum, register

BANDWIDTH = 1e-3
INIT_THRESHOLD = 1e-3


class _JumpReLUL0(torch.autograd.Function):
    """pre [B, d_sae], θ [d_sae] -> (a = pre·[pre > θ], l0 [B] = Σ_i [pre_i > θ_i]), fused.

    Backward: ∂/∂pre passes through the open gate; θ gets the rectangle-kernel pseudo-gradients
    of both outputs, −(1/ε)·K·(θ·g_a + g_l0).
    """

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor):
        on = pre > theta
        ctx.save_for_backward(pre, theta, on)
        return pre * on, on.sum(-1, dtype=pre.dtype)

    @staticmethod
    def backward(ctx, g_a: Tensor, g_l0: Tensor):
        pre, theta, on = ctx.saved_tensors
        near = ((pre - theta).abs() < BANDWIDTH / 2).to(pre.dtype)
        g_theta = (-(near * (theta * g_a + g_l0.unsqueeze(-1))) / BANDWIDTH).sum_to_size(theta.shape)
        return g_a * on, g_theta


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
        # θ > 0 (kept so by after_step), so relu(pre)·[pre > θ] = pre·[pre > θ]. Only entries with
        # pre > θ − ε matter (open gate or inside the kernel window |pre − θ| < ε/2).
        b_in = self.b_dec if self.cfg.apply_b_dec_to_input else None
        theta = self.threshold
        with torch.no_grad():  # pre > θ − ε, with room for the rounding of pre = x'W_enc + b_enc
            thr = theta - BANDWIDTH - 1e-5 * (theta.abs() + self.b_enc.abs())
        c = sparse_train.encode(x.to(self.W_enc.dtype), b_in, self.W_enc, self.b_enc, thr)
        if c.pattern is None:
            a, l0 = _JumpReLUL0.apply(c.pre, theta)  # [B, d_sae], [B]
        else:  # one "row" per entry: [nnz, 1]
            a, l0 = _JumpReLUL0.apply(c.pre.unsqueeze(1), c.feature(theta).unsqueeze(1))
            a = a.squeeze(1)
        recon = c.decode(a, self.W_dec, self.b_dec)
        mse = mse_sum(recon, target)
        sparsity = l0.sum() / c.batch
        zero = mse.new_zeros(())
        return LossParts(mse + coeff * sparsity, mse, sparsity, zero, c.fired(a > 0), recon)

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        self.threshold.clamp_(min=1e-6)
