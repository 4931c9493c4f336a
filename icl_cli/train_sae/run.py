"""`icl train-sae` as a store step: one artifact per trained dictionary.

    res = train_sae_artifacts(store, cfg, lm, resume=False, name=None, force=False, progress=None)

Each artifact is a SAELens folder (cfg.json, sae_weights.safetensors, sparsity.safetensors) plus
curves.h5 with the training curves; its manifest metrics hold l0, fvu, dead_fraction and
ce_recovered. Layers that already have an artifact are reused; the others train together, with
their checkpoints in the work dir of the first pending layer's key (so --resume finds them).
Each layer's weights depend only on its own key (trainer.init_generator), so which layers train
together changes nothing. The run holds the locks of all its pending keys until they are
published: a second process asking for the same layers waits, then reuses them (if it asked for
other layers too, it trains only those still missing).

Under torchrun (distributed.py) rank 0 does all of the above; before each group it trains it
sends the group's layers and work dir to the other ranks, which train alongside it and publish
nothing (``follow``), until rank 0 sends None.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable

from icl_cli.train_sae.config import TrainConfig

VERSION = 3  # 2: CE recovered on answer tokens for the toy corpus; 3: per-layer initialisation


@dataclass
class SaeArtifact:
    layer: int
    key: str
    metrics: dict
    reused: bool


def _write(st, r) -> dict:
    from icl_cli.dictionaries.io import save_saelens

    save_saelens(r.sae, st.dir, sparsity=r.sparsity,
                 save_file=lambda name, tensors, metadata=None: st.save_safetensors(name, tensors, metadata))
    with st.h5("curves.h5") as f:
        for k, v in r.curves.items():
            f.create_dataset(k, data=v)
        f.attrs["layer"] = r.layer
    return r.metrics


def layer_spec(cfg: TrainConfig, layer: int, ident: dict):
    """The store step of one layer's dictionary; ``cfg`` resolved, ``ident`` = model_fingerprint,
    dtype and device as strings (what the activations come from)."""
    from icl_cli.store import StepSpec

    return StepSpec(step="train-sae", params={**cfg.params(layer), **ident}, version=VERSION)


def train_sae_artifacts(
    store, cfg: TrainConfig, lm, resume: bool = False, name: str | None = None, force: bool = False,
    progress: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None,
) -> list[SaeArtifact]:
    from icl_cli.train_sae import distributed as dist

    grp = dist.current()
    if grp.active and not grp.leader:
        return follow(cfg, lm, grp, resume)
    try:
        return _leader(store, cfg, lm, resume, name, force, progress, log, grp)
    finally:
        dist.broadcast_object(None, grp)  # releases the other ranks


def follow(cfg: TrainConfig, lm, grp, resume: bool) -> list[SaeArtifact]:
    """A rank other than 0: train each group rank 0 announces (its work dir for --resume), return
    nothing (rank 0 publishes)."""
    from pathlib import Path

    from icl_cli.train_sae import distributed as dist
    from icl_cli.train_sae.trainer import train_dictionaries

    cfg = cfg.resolved(lm.d_model, lm.n_layers)
    while True:
        msg = dist.broadcast_object(None, grp)
        if msg is None:
            return []
        layers, work_dir = msg
        train_dictionaries(replace(cfg, layers=layers), lm, work_dir=Path(work_dir), resume=resume)


def _leader(store, cfg, lm, resume, name, force, progress, log, grp) -> list[SaeArtifact]:
    from icl_cli.store.lock import key_lock
    from icl_cli.train_sae import distributed as dist
    from icl_cli.train_sae.trainer import train_dictionaries

    from icl_cli.core.identity import model_fingerprint

    cfg = cfg.resolved(lm.d_model, lm.n_layers)
    # the weights and precision the activations come from are part of what an SAE is
    fingerprint = model_fingerprint(lm.model)
    ident = {"model_fingerprint": fingerprint, "dtype": str(lm.dtype), "device": str(lm.device)}
    specs = {l: layer_spec(cfg, l, ident) for l in cfg.layers}
    pending = [l for l in cfg.layers if force or store.lookup(specs[l]) is None]
    trained: dict[int, Any] = {}

    def build_for(layer: int):
        def build(st) -> dict:
            if layer not in trained:
                # under this key's lock: train what is still missing (another process may have
                # published some layers meanwhile); layers are independent, so the result is the same
                todo = [l for l in pending if l not in trained and (force or store.lookup(specs[l]) is None)]
                group = replace(cfg, layers=todo if layer in todo else [layer])
                dist.broadcast_object((group.layers, str(st.work_dir)), grp)  # the other ranks join
                for r in train_dictionaries(group, lm, work_dir=st.work_dir, resume=resume, progress=progress):
                    trained[r.layer] = r
            trained[layer].sae.cfg.extra["model_fingerprint"] = fingerprint
            return _write(st, trained[layer])

        return build

    out = []
    with contextlib.ExitStack() as locks:
        # Hold every pending layer's lock (in key order, so two runs cannot deadlock) until all are
        # published: a concurrent run of the same layers waits for the whole group, then reuses it.
        for l in sorted(pending, key=lambda l: specs[l].key):
            def waiting(holder: str, l: int = l) -> None:
                (log or (lambda m: None))(f"waiting for {holder}, which is training layer {l} ({specs[l].key[:12]}) in this store")

            locks.enter_context(key_lock(store.root, specs[l].key, on_wait=waiting))
        for l in cfg.layers:
            tag = None if name is None else (name if len(cfg.layers) == 1 else f"{name}.{l}")
            res = store.run(specs[l], build_for(l), name=tag, force=force and l in pending, log=log)
            out.append(SaeArtifact(l, res.artifact.key, dict(res.artifact.metrics or {}), res.reused))
    return out
