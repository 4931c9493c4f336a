"""Reader for the paper authors' Gemma-1 SAE files (SPEC §9).

One safetensors file with W_enc, b_enc, W_dec, b_dec, s_gate, b_gate, scaling_factor,
mean_norm and optionally tgt_mean_norm. Their encoding, with d the model width:

    n   = √d / mean_norm                       (input normalisation)
    s   = softplus(s_gate) · scaling_factor    (per-feature magnitude scale)
    pre = (x·n @ W_enc + b_enc) · s
    a   = relu(pre) · [relu(pre) > max(0, b_gate − b_enc·s)]
    x̂   = (a @ W_dec + b_dec) / n_out,  n_out = √d / tgt_mean_norm (or n when absent)

This is a JumpReLU dictionary with no input centring once the scales are folded in:
W_enc' = n·W_enc·s, b_enc' = b_enc·s, θ = max(0, b_gate − b_enc·s), W_dec' = W_dec/n_out,
b_dec' = b_dec/n_out (θ ≥ 0, so relu(pre) > θ ⇔ pre > θ).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from icl_cli.dictionaries.base import DictConfig, Dictionary, build
from icl_cli.core.errors import IclError

REQUIRED = ("W_enc", "b_enc", "W_dec", "b_dec", "s_gate", "b_gate", "scaling_factor", "mean_norm")


def is_authors_file(keys: set[str]) -> bool:
    return set(REQUIRED) <= keys


def read_authors(path: Path, **cfg_fields) -> Dictionary:
    """Load an authors'-format file as a model-space JumpReLU dictionary."""
    from safetensors.torch import load_file

    t = {k: v.float() for k, v in load_file(str(path)).items()}
    missing = [k for k in REQUIRED if k not in t]
    if missing:
        raise IclError(f"{path} is not an authors' SAE file: it lacks {missing}")
    d = t["b_dec"].shape[0]
    W_enc = t["W_enc"]
    if W_enc.shape[0] != d:  # stored [d_sae, d]
        W_enc = W_enc.T
    W_dec = t["W_dec"]
    if W_dec.shape[1] != d:
        W_dec = W_dec.T
    d_sae = W_enc.shape[1]
    n = math.sqrt(d) / float(t["mean_norm"].reshape(-1)[0])
    n_out = math.sqrt(d) / float(t["tgt_mean_norm"].reshape(-1)[0]) if "tgt_mean_norm" in t else n
    s = F.softplus(t["s_gate"]) * t["scaling_factor"]
    s = s.expand(d_sae) if s.numel() == 1 else s.reshape(d_sae)

    cfg = DictConfig(d_in=d, d_sae=d_sae, arch="jumprelu", apply_b_dec_to_input=False,
                     extra={"format": "authors", "file": str(path)}, **cfg_fields)
    cfg.apply_b_dec_to_input = False
    sae = build(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc * n * s)
        sae.b_enc.copy_(t["b_enc"].reshape(d_sae) * s)
        sae.threshold.copy_(torch.clamp(t["b_gate"].reshape(d_sae) - t["b_enc"].reshape(d_sae) * s, min=0.0))
        sae.W_dec.copy_(W_dec / n_out)
        sae.b_dec.copy_(t["b_dec"] / n_out)
    return sae
