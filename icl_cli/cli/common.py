"""Helpers shared by the commands that run a model: loading with the global options, progress
on stderr, and the artifact summary line."""

from __future__ import annotations

import contextlib
import time
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


PLAIN_EVERY_S = 10.0
"""On a stderr that is not a terminal, a progress line at most this often (and the last one)."""


class PlainProgress:
    """Progress for a stderr that is a file or a pipe (logs, CI): plain lines instead of a live bar,
    the first update, then at most one every ``PLAIN_EVERY_S`` seconds, and the last."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total
        self.start = self.last = time.perf_counter()
        self.printed = False

    def update(self, done: int, label: str = "", info: str = "") -> None:
        now = time.perf_counter()
        if self.printed and done < self.total and now - self.last < PLAIN_EVERY_S:
            return
        self.printed, self.last = True, now
        parts = [self.what, label, f"{done}/{self.total}", info, f"({now - self.start:.0f} s)"]
        stderr_console().print("  ".join(p for p in parts if p), markup=False, highlight=False)


def live_progress() -> bool:
    """Whether progress may draw live bars (stderr is a terminal) or must print plain lines."""
    return stderr_console().is_terminal


@contextlib.contextmanager
def task_progress(gl: Globals, total: int, what: str) -> Iterator:
    """Progress on stderr (whatever -q and --json say: they change stdout only); yields
    ``advance(label)``. A live bar on a terminal, plain lines otherwise (see PlainProgress)."""
    if not live_progress():
        plain, done = PlainProgress(what, total), 0

        def advance_plain(label: str) -> None:
            nonlocal done
            if not label.startswith("…"):
                done += 1
                plain.update(done, label)

        yield advance_plain
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"{what} [bold]{{task.fields[label]}}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=stderr_console(), transient=False) as bar:
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
    from icl_cli.core.errors import IclError

    try:
        return store.resolve(ref)
    except IclError:
        return None
