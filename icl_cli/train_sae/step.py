"""The train-sae step as one call (``icl train-sae``, ``icl pipeline``): one dictionary artifact
per layer, reused when it exists.

    out = run_train_sae(env, TrainSaeRequest(model="toy-icl", layer=["4,5"], tokens=300_000))
    [(r.layer, r.key) for r in out.results]

When every layer's artifact exists it is found from the model's config and this machine alone
(no model load, no torch). Under torchrun every rank trains; rank 0 alone publishes and reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, ContextManager, List, Optional

from icl_cli.core.errors import IclError
from icl_cli.core.runenv import RunEnv

TrainProgress = Callable[[dict], None]
"""Called with {step, total_steps, tokens_per_s, l0, fvu} as training goes."""


@dataclass
class TrainSaeRequest:
    """The options of one train-sae run (defaults: those of ``icl train-sae``)."""

    model: str = "toy-icl"
    """Model preset, HF id or local folder."""
    layer: List[str] = field(default_factory=lambda: ["all"])
    """Layer(s): each entry '3', '1,3,5', '2-7' or 'all'."""
    site: str = "resid"
    """resid (resid_pre) | attn (attn_out) | transcoder (mlp_in -> mlp_out)."""
    arch: str = "gated"
    """gated (paper) | standard | topk | jumprelu."""
    width: Optional[int] = None
    """Features per dictionary (default 16 × d_model)."""
    k: int = 32
    """Active features per token (top-k)."""
    l1: Optional[float] = None
    """Sparsity coefficient (default: per architecture)."""
    lr: float = 4e-4
    """Adam learning rate."""
    tokens: Optional[int] = None
    """Training tokens (default 2M for toy-icl, 300M otherwise)."""
    batch_tokens: int = 4096
    """Tokens per step."""
    ctx: int = 128
    """Context length of the activation chunks."""
    dataset: Optional[str] = None
    """HF dataset or local .txt/.jsonl (default: the toy's task prompts, else FineWeb)."""
    eval_tokens: int = 16384
    """Held-out tokens for the final metrics."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: none)."""
    resume: bool = False
    """Continue from the last checkpoint of an interrupted run."""
    name: Optional[str] = None
    """Name the artifact (NAME.LAYER for several layers)."""
    force: bool = False
    """Retrain even if the artifact exists."""

    def config(self, seed: int):
        """The TrainConfig of this request (its layers are resolved later, from the model)."""
        from icl_cli.train_sae.config import TrainConfig

        cfg = TrainConfig(model=self.model, layers=[0], site=self.site, arch=self.arch, width=self.width, k=self.k,
                          l1=self.l1, lr=self.lr, tokens=self.tokens or 0, batch_tokens=self.batch_tokens, ctx=self.ctx,
                          dataset=self.dataset, eval_tokens=self.eval_tokens, checkpoint_every=self.checkpoint_every,
                          seed=seed)
        if self.tokens is not None and self.tokens <= 0:
            raise IclError("--tokens must be positive")
        if self.checkpoint_every < 0:
            raise IclError("--checkpoint-every must be ≥ 0")
        return cfg


@dataclass
class TrainSaeOutcome:
    results: list | None = None
    """SaeArtifact (layer, key, metrics, reused) per layer; None on a torchrun rank other than 0."""


def run_train_sae(env: RunEnv, req: TrainSaeRequest,
                  progress: Callable[[], ContextManager[TrainProgress]] | None = None) -> TrainSaeOutcome:
    """Train (or reuse) one dictionary per requested layer. ``progress()`` opens the training
    progress display (rank 0 only)."""
    from icl_cli.core.layers import parse_layers

    cfg = req.config(env.seed)
    # under torchrun every rank must take the same path: no shortcut that skips the model
    torchrun = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1", "0")
    results = None if (req.force or torchrun) else _all_reused(env, cfg, req.layer, req.name)
    if results is not None:
        return TrainSaeOutcome(results)
    from icl_cli.train_sae.distributed import init_from_env
    from icl_cli.train_sae.run import train_sae_artifacts

    grp = init_from_env()
    lm = env.load_lm(req.model)
    cfg.layers = parse_layers(req.layer, lm.n_layers)
    if not cfg.layers:
        raise IclError("give at least one --layer")
    if not grp.leader:  # rank 0 reports, publishes and prints
        train_sae_artifacts(env.store, cfg, lm, resume=req.resume, name=req.name, force=req.force)
        return TrainSaeOutcome()
    if grp.active:
        env.log(f"data-parallel over {grp.world} processes")
    with (progress or _no_progress)() as on_step:
        results = train_sae_artifacts(env.store, cfg, lm, resume=req.resume, name=req.name, force=req.force,
                                      progress=on_step, log=env.log)
    return TrainSaeOutcome(results)


class _no_progress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> bool:
        return False


def _all_reused(env: RunEnv, cfg, layer: List[str], name: Optional[str]):
    """The artifacts of every requested layer when all exist, found from the model's config and
    this machine without loading the model or importing torch; None when any is missing or the
    key cannot be known that way (then the ordinary path loads the model and decides)."""
    from dataclasses import replace

    from icl_cli.core.identity import model_info
    from icl_cli.core.layers import parse_layers
    from icl_cli.train_sae.run import SaeArtifact, layer_spec

    cpu = env.cpu_device_dtype()
    if cpu is None:
        return None
    fingerprint, n_layers, d_model = model_info(cfg.model, env.trust_remote_code)
    if fingerprint is None:
        return None
    layers = parse_layers(layer, n_layers)
    if not layers:
        return None
    resolved = replace(cfg, layers=layers).resolved(d_model, n_layers)
    ident = {"model_fingerprint": fingerprint, "dtype": cpu[1], "device": cpu[0]}
    store = env.store
    arts = {l: store.lookup(layer_spec(resolved, l, ident)) for l in resolved.layers}
    if any(a is None for a in arts.values()):
        return None
    out = []
    for l, art in arts.items():
        env.log(f"reusing {art.key[:12]} (step train-sae); pass --force to retrain")
        if name is not None:
            store.tag(art, name if len(arts) == 1 else f"{name}.{l}")
        out.append(SaeArtifact(l, art.key, dict(art.metrics), True))
    return out
