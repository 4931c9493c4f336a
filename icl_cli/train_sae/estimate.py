"""``icl train-sae --estimate``: the memory a training run needs, from shapes only
(icl_cli/core/memory.py). Nothing heavy is loaded: the model's config alone.

    est = estimate_train_sae(env, TrainSaeRequest(model="toy-icl", layer=["3,5"]))
    est.data["total_gib"], est.data["free_gib"]
"""

from __future__ import annotations

from dataclasses import dataclass
from icl_cli.core.runenv import RunEnv
from icl_cli.train_sae.step import TrainSaeRequest


@dataclass
class SaeEstimate:
    data: dict
    """The JSON document: model, layers, free_gib and the Phased estimate (core/memory.py)."""
    width: int
    """Features per dictionary."""


def model_shape(env: RunEnv, model: str):
    """(ModelShape, device) of ``model`` in the run's dtype, from its config alone."""
    import torch

    from icl_cli.core.memory import ModelShape
    from icl_cli.core.models import load_config, resolve_device, resolve_dtype

    config = load_config(model, env.trust_remote_code)
    device = resolve_device(env.device)
    dtype = resolve_dtype(env.dtype, device)
    return ModelShape.of(config, torch.tensor([], dtype=dtype).element_size()), device


def free_gib(device) -> float | None:
    """Free memory of ``device`` in GiB (None when unknown)."""
    from icl_cli.circuit.estimate import free_memory

    free = free_memory(device)
    return None if free is None else free / (1 << 30)


def estimate_train_sae(env: RunEnv, req: TrainSaeRequest) -> SaeEstimate:
    """Memory of one train-sae run (every layer's dictionary shares the forward passes)."""
    from icl_cli.core.layers import parse_layers
    from icl_cli.core.memory import train_sae_memory

    cfg = req.config(env.seed)
    shape, device = model_shape(env, cfg.model)
    chosen = parse_layers(req.layer, shape.n_layers)
    width = cfg.width or 16 * shape.d_model
    est = train_sae_memory(shape, width, len(chosen), cfg.site == "transcoder", cfg.arch, cfg.batch_tokens,
                           cfg.buffer_batches, cfg.ctx, store_bytes=4 if device.type == "cpu" else 2)
    return SaeEstimate({"model": cfg.model, "layers": chosen, "free_gib": free_gib(device), **est.to_json()}, width)
