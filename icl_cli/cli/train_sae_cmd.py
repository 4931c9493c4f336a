"""``icl train-sae``: SAEs and transcoders for a model (SPEC §9).

    icl train-sae --layer all                                   # gated residual SAEs, toy model
    icl train-sae --site transcoder --layer 2,3 --arch topk --k 16
    icl train-sae --model gemma-1-2b --layer 12 --width 32768 --dataset HuggingFaceFW/fineweb
    KEY=$(icl -q train-sae --layer 3)
    torchrun --nproc-per-node 4 -m icl_cli train-sae --layer 12   # data-parallel (train_sae/distributed.py)
"""

from __future__ import annotations

from typing import List, Optional

import typer

from icl_cli.cli.common import run_env, train_progress
from icl_cli.cli.context import emit, g


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
        from icl_cli.train_sae.step import TrainSaeRequest, run_train_sae

        gl = g(ctx)
        req = TrainSaeRequest(model=model, layer=layer, site=site, arch=arch, width=width, k=k, l1=l1, lr=lr, tokens=tokens,
                              batch_tokens=batch_tokens, ctx=ctx_len, dataset=dataset, eval_tokens=eval_tokens,
                              checkpoint_every=checkpoint_every, resume=resume, name=name, force=force)
        if estimate:
            from icl_cli.cli.estimates import emit_train_sae_estimate
            from icl_cli.train_sae.estimate import estimate_train_sae

            return emit_train_sae_estimate(gl, estimate_train_sae(run_env(gl), req), arch)
        results = run_train_sae(run_env(gl), req, progress=lambda: train_progress(gl)).results
        if results is None:  # a torchrun rank other than 0: rank 0 prints
            return

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
