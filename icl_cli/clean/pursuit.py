"""Nonnegative gradient pursuit (inference-time optimisation, Smith 2024; SPEC §5 baseline).

Decompose a target x [D] into at most k atoms of a dictionary D [n, D] with nonnegative weights:

    w = 0
    repeat k times:
        r = x − wᵀD                         residual
        S ← S ∪ {argmaxᵢ ⟨dᵢ, r⟩}           grow the support
        g = ⟨D_S, r⟩ on S, 0 elsewhere       gradient of ½‖r‖² wrt w, restricted to S
        c = D_Sᵀ g                           direction in signal space
        η = ⟨c, r⟩ / ⟨c, c⟩                  exact line search
        w ← max(0, w + η g)
"""

from __future__ import annotations

import torch
from torch import Tensor


def gradient_pursuit(x: Tensor, atoms: Tensor, k: int) -> Tensor:
    """Weights w [n] (at most k nonzero, all ≥ 0) with wᵀ atoms ≈ x. x [D], atoms [n, D]."""
    x, atoms = x.double(), atoms.double()
    w = torch.zeros(atoms.shape[0], dtype=torch.float64, device=x.device)
    support = torch.zeros_like(w, dtype=torch.bool)
    for _ in range(k):
        r = x - w @ atoms
        support[torch.argmax(atoms @ r)] = True
        g = torch.where(support, atoms @ r, torch.zeros_like(w))
        c = g @ atoms
        cc = c @ c
        if cc <= 0:
            break
        w = torch.clamp(w + (c @ r) / cc * g, min=0.0)
    return w


def pursuit_vector(v: Tensor, sae, k: int) -> tuple[Tensor, int]:
    """Reconstruct v from ≤ k unit-norm decoder directions of ``sae`` (around its decoder bias).

    Returns (vector [D] in v's dtype, number of atoms used).
    """
    W = sae.W_dec.detach().double()
    norms = W.norm(dim=1, keepdim=True).clamp(min=1e-12)
    b = sae.b_dec.detach().double()
    w = gradient_pursuit(v.double() - b, W / norms, k)
    return (b + w @ (W / norms)).to(v.dtype), int((w > 0).sum())
