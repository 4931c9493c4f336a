"""What both edge computations share (edges.py, the batched one, and edges_ref.py, its tiled and
per-node references): node and edge types, which sites feed which, and a column-sliced encoder."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from icl_cli.circuit.splice import Key

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


class Captured(Exception):
    """Leaves a pass once the downstream site's input and output are known."""
