"""Helpers shared by the commands that run a model: loading with the global options, progress
on stderr, and the artifact summary line."""

from __future__ import annotations

import contextlib
from typing import Iterator

from icl_cli.cli.context import Globals, log, stderr_console


def load_lm(gl: Globals, model: str):
    """Load a model with the global --device / --dtype / --device-map, seeding torch first."""
    import torch
    from transformers.utils import logging as hf_logging

    from icl_cli.core.models import load_model

    if not gl.verbose:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    torch.manual_seed(gl.seed)
    log(f"loading {model}", ctx_globals=gl)
    return load_model(model, device=gl.device, dtype=gl.dtype, device_map=gl.device_map,
                      trust_remote_code=gl.trust_remote_code)


@contextlib.contextmanager
def task_progress(gl: Globals, total: int, what: str) -> Iterator:
    """A progress bar on stderr; yields ``advance(label)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"{what} [bold]{{task.fields[label]}}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=stderr_console(), disable=gl.quiet, transient=False) as bar:
        task = bar.add_task(what, total=total, label="")

        def advance(label: str) -> None:
            bar.update(task, advance=0 if label.startswith("…") else 1, label=label)

        yield advance


def saved(gl: Globals, res) -> None:
    """Say on stderr whether an artifact was computed or reused."""
    verb = "reused" if res.reused else "saved"
    log(f"{verb} {res.artifact.step} artifact {res.artifact.key[:12]}", ctx_globals=gl)


def maybe_artifact(store, ref: str):
    """The store artifact ``ref`` names, or None when it names none (a folder, file or release id)."""
    from icl_cli.errors import IclError

    try:
        return store.resolve(ref)
    except IclError:
        return None
