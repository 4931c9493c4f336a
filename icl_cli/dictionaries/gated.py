"""Gated SAE with a weight-tied gate (Rajamanoharan et al. 2024), the paper's architecture.

    x' = x - b_dec
    gate: π = x' @ W_enc + b_gate          feature i is on iff π_i > 0
    magnitude: pre = x' @ (W_enc · exp(r_mag)) + b_mag
    a = [π > 0] · relu(pre)

Because the gate shares W_enc, [π_i > 0] ⇔ pre_i > b_mag_i − exp(r_mag_i)·b_gate_i, so the
activation is a JumpReLU of `pre` with that threshold; `activate(pre)` uses this form, which is
what task-vector cleaning (SPEC §5) optimises through.
Loss: ‖t − x̂‖² + λ Σ relu(π)_i ‖W_dec[i]‖ + ‖t − (relu(π) @ sg(W_dec) + sg(b_dec))‖².
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icl_cli.dictionaries import sparse_train
from icl_cli.dictionaries.base import DictConfig, Dictionary, LossParts, mse_sum, register


@register("gated")
class GatedSAE(Dictionary):
    default_coeff = 2.0

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        del self.b_enc  # the gated SAE has b_gate / b_mag instead (SAELens layout)
        dt = self.W_enc.dtype
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        for name in ("b_gate", "b_mag", "r_mag"):
            if hasattr(self, name):
                getattr(self, name).zero_()

    @torch.no_grad()
    def reinit_features(self, idx: Tensor, directions: Tensor, enc_norm: float) -> None:
        super().reinit_features(idx, directions, enc_norm)
        self.b_gate[idx] = 0.0
        self.b_mag[idx] = 0.0
        self.r_mag[idx] = 0.0

    @property
    def threshold(self) -> Tensor:
        """[d_sae] the magnitude threshold equivalent to the gate."""
        return self.b_mag - torch.exp(self.r_mag) * self.b_gate

    def encode_pre(self, x: Tensor) -> Tensor:
        return self.sae_in(x) @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def encode(self, x: Tensor) -> Tensor:
        # The gate form: exact at the boundary, one matmul for both paths.
        proj = self.sae_in(x) @ self.W_enc  # [.., d_sae]
        gate = (proj + self.b_gate) > 0
        return gate.to(proj.dtype) * torch.relu(proj * torch.exp(self.r_mag) + self.b_mag)

    def training_loss(self, x: Tensor, target: Tensor, coeff: float, dead: Tensor | None = None) -> LossParts:
        # only entries with an open gate matter: proj > −b_gate ⇔ π = proj + b_gate > 0 exactly in
        # floating point (a rounded sum keeps the sign of the exact one)
        b_in = self.b_dec if self.cfg.apply_b_dec_to_input else None
        c = sparse_train.encode(x.to(self.W_enc.dtype), b_in, self.W_enc, None, -self.b_gate.detach())
        proj = c.pre  # [B, d_sae], or [nnz] at the open gates
        pi = proj + c.feature(self.b_gate)
        f_gate = torch.relu(pi)
        a = (pi > 0).to(proj.dtype) * torch.relu(proj * c.feature(torch.exp(self.r_mag)) + c.feature(self.b_mag))
        recon = c.decode(a, self.W_dec, self.b_dec)
        mse = mse_sum(recon, target)
        sparsity = c.feature_sum(f_gate) @ self.W_dec.norm(dim=1) / c.batch
        via_gate = c.decode(f_gate, self.W_dec.detach(), self.b_dec.detach())
        aux = mse_sum(via_gate, target)
        return LossParts(mse + coeff * sparsity + aux, mse, sparsity, aux, c.fired(a > 0), recon)
