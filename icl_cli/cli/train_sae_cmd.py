"""``icl train-sae``: SAEs and transcoders for a model (SPEC §9).

    icl train-sae --layer all                                   # gated residual SAEs, toy model
    icl train-sae --site transcoder --layer 2,3 --arch topk --k 16
    icl train-sae --model gemma-1-2b --layer 12 --width 32768 --dataset HuggingFaceFW/fineweb
    KEY=$(icl -q train-sae --layer 3)
    torchrun --nproc-per-node 4 -m icl_cli train-sae --layer 12   # data-parallel (train_sae/distributed.py)
"""

from __future__ import annotations

import os
from typing import List, Optional

import typer

from icl_cli.cli.context import emit, g, stderr_console
from icl_cli.core.errors import IclError


def register(app: typer.Typer) -> None:
    @app.command("train-sae")
    def train_sae(
        ctx: typer.Context,
        model: str = typer.Option("toy-icl", "--model", help="Model preset, HF id or local folder."),
        layer: List[str] = typer.Option(["all"], "--layer", help="Layer(s): repeat, or '1,3,5', or 'all'."),
        site: str = typer.Option("resid", "--site", help="resid (resid_pre) | attn (attn_out) | transcoder (mlp_in -> mlp_out)."),
        arch: str = typer.Option("gated", "--arch", help="gated (paper) | standard | topk | jumprelu."),
        width: Optional[int] = typer.Option(None, "--width", help="Features per dictionary (default 16 × d_model)."),
        k: int = typer.Option(32, "--k", help="Active features per token (top-k)."),
        l1: Optional[float] = typer.Option(None, "--l1", help="Sparsity coefficient (default: per architecture)."),
        lr: float = typer.Option(4e-4, "--lr", help="Adam learning rate (paper 4e-4)."),
        tokens: Optional[int] = typer.Option(None, "--tokens", help="Training tokens (default 2M for toy-icl, 300M otherwise)."),
        batch_tokens: int = typer.Option(4096, "--batch-tokens", help="Tokens per step."),
        ctx_len: int = typer.Option(128, "--ctx", help="Context length of the activation chunks."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="HF dataset (streamed) or local .txt/.jsonl (default: the toy's task prompts, else FineWeb)."),
        eval_tokens: int = typer.Option(16384, "--eval-tokens", help="Held-out tokens for the final metrics."),
        checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Steps between checkpoints (0: none)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint of an interrupted run."),
        name: Optional[str] = typer.Option(None, "--name", help="Name the artifact (NAME.LAYER for several layers)."),
        force: bool = typer.Option(False, "--force", help="Retrain even if the artifact exists."),
        estimate: bool = typer.Option(False, "--estimate", help="Only print the memory the run needs (nothing runs)."),
    ) -> None:
        """Train SAEs / transcoders; one artifact (a SAELens folder) per layer."""
        gl = g(ctx)
        from icl_cli.train_sae.config import TrainConfig

        cfg = TrainConfig(model=model, layers=[0], site=site, arch=arch, width=width, k=k, l1=l1, lr=lr,
                          tokens=tokens or 0, batch_tokens=batch_tokens, ctx=ctx_len, dataset=dataset,
                          eval_tokens=eval_tokens, checkpoint_every=checkpoint_every, seed=gl.seed)
        if tokens is not None and tokens <= 0:
            raise IclError("--tokens must be positive")
        if checkpoint_every < 0:
            raise IclError("--checkpoint-every must be ≥ 0")

        if estimate:
            from icl_cli.cli.estimates import train_sae_estimate

            return train_sae_estimate(gl, cfg, layer)
        from icl_cli.cli.common import load_lm
        from icl_cli.core.layers import parse_layers

        say = lambda m: stderr_console().print(m, style="dim", markup=False)  # noqa: E731
        # under torchrun every rank must take the same path: no shortcut that skips the model
        torchrun = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1", "0")
        results = None if (force or torchrun) else _all_reused(gl, cfg, layer, name, say)
        if results is None:
            from icl_cli.train_sae.distributed import init_from_env
            from icl_cli.train_sae.run import train_sae_artifacts

            grp = init_from_env()
            lm = load_lm(gl, model)
            cfg.layers = parse_layers(layer, lm.n_layers)
            if not cfg.layers:
                raise IclError("give at least one --layer")
            if not grp.leader:  # rank 0 reports, publishes and prints
                train_sae_artifacts(gl.store(), cfg, lm, resume=resume, name=name, force=force)
                return
            if grp.active:
                say(f"data-parallel over {grp.world} processes")
            with _progress_bar(gl) as progress:
                results = train_sae_artifacts(gl.store(), cfg, lm, resume=resume, name=name, force=force,
                                              progress=progress, log=say)

        def row(r):
            m = r.metrics
            return {"key": r.key, "layer": r.layer, "reused": r.reused,
                    "metrics": {k: m.get(k) for k in ("l0", "fvu", "dead_fraction", "ce_recovered")}}

        rows = [row(r) for r in results]

        def table():
            from rich.table import Table

            t = Table(title=f"{arch} {site} dictionaries for {model}")
            for col in ("layer", "L0", "FVU", "dead", "CE recovered", "key", ""):
                t.add_column(col, justify="left" if col in ("key", "") else "right")
            for r in rows:
                m = r["metrics"]
                f = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
                t.add_row(str(r["layer"]), f(m["l0"], 1), f(m["fvu"], 3), f(m["dead_fraction"], 3),
                          f(m["ce_recovered"], 3), r["key"][:12], "reused" if r["reused"] else "")
            return t

        data = [{"key": r["key"], "metrics": r["metrics"]} for r in rows]
        emit(gl, data=data[0] if len(data) == 1 else data, table=table, keys=[r["key"] for r in rows])


def _all_reused(gl, cfg, layer: List[str], name: Optional[str], say):
    """The artifacts of every requested layer when all exist, found from the model's config and
    this machine without loading the model or importing torch; None when any is missing or the
    key cannot be known that way (then the ordinary path loads the model and decides)."""
    from dataclasses import replace

    from icl_cli.cli.fastpath import cpu_device_dtype
    from icl_cli.core.identity import model_info
    from icl_cli.core.layers import parse_layers
    from icl_cli.train_sae.run import SaeArtifact, layer_spec

    cpu = cpu_device_dtype(gl)
    if cpu is None:
        return None
    fingerprint, n_layers, d_model = model_info(cfg.model, gl.trust_remote_code)
    if fingerprint is None:
        return None
    layers = parse_layers(layer, n_layers)
    if not layers:
        return None
    resolved = replace(cfg, layers=layers).resolved(d_model, n_layers)
    ident = {"model_fingerprint": fingerprint, "dtype": cpu[1], "device": cpu[0]}
    store = gl.store()
    arts = {l: store.lookup(layer_spec(resolved, l, ident)) for l in resolved.layers}
    if any(a is None for a in arts.values()):
        return None
    out = []
    for l, art in arts.items():
        say(f"reusing {art.key[:12]} (step train-sae); pass --force to retrain")
        if name is not None:
            store.tag(art, name if len(arts) == 1 else f"{name}.{l}")
        out.append(SaeArtifact(l, art.key, dict(art.metrics), True))
    return out


class _progress_bar:
    """Progress on stderr showing tokens/s, L0 and FVU (also under -q and --json: they change
    stdout only): a live bar on a terminal, plain lines otherwise."""

    def __init__(self, gl):
        self.bar = None
        self.plain = None

    def __enter__(self):
        from icl_cli.cli.common import PlainProgress, live_progress

        if not live_progress():
            def plain(info: dict) -> None:
                if self.plain is None:
                    self.plain = PlainProgress("train-sae", info["total_steps"])
                self.plain.update(info["step"], "steps", _info_text(info))

            return plain
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train-sae"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            console=stderr_console(), transient=True)
        self.bar.start()
        self.task = None
        return self.update

    def update(self, info: dict) -> None:
        if self.task is None:
            self.task = self.bar.add_task("train", total=info["total_steps"], info="")
        self.bar.update(self.task, completed=info["step"], info=_info_text(info))

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _info_text(info: dict) -> str:
    return f"{info['tokens_per_s']:,.0f} tok/s  L0 {info['l0']:.1f}  FVU {info['fvu']:.3f}"
