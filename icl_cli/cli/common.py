"""Helpers shared by the commands that run a library step: the step's run environment built from
the global options (its log and progress go to stderr), and progress on stderr."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from icl_cli.cli.context import Globals, log, stderr_console
from icl_cli.core.runenv import RunEnv


def run_env(gl: Globals) -> RunEnv:
    """The library's run environment under the global options: logs and progress on stderr."""
    return RunEnv(store_path=gl.store_path, device=gl.device, dtype=gl.dtype, seed=gl.seed, device_map=gl.device_map,
                  trust_remote_code=gl.trust_remote_code, verbose=gl.verbose, log=lambda m: log(m, ctx_globals=gl),
                  progress=lambda total, what: task_progress(gl, total, what))


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
        last = done >= self.total and not label.startswith("…")  # a "…" label says where a unit is: never forced
        if self.printed and not last and now - self.last < PLAIN_EVERY_S:
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
            plain.update(done, label)  # "…" labels (where a long unit of work is) too, at most every 10 s

        yield advance_plain
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"{what} [bold]{{task.fields[label]}}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=stderr_console(), transient=False) as bar:
        task = bar.add_task(what, total=total, label="")

        def advance(label: str) -> None:
            bar.update(task, advance=0 if label.startswith("…") else 1, label=label)

        yield advance


class train_progress:
    """Progress of `icl train-sae` on stderr showing tokens/s, L0 and FVU (also under -q and --json:
    they change stdout only): a live bar on a terminal, plain lines otherwise. Enters as the
    library's ``progress(info)`` callback (train_sae/step.py)."""

    def __init__(self, gl: Globals):
        self.bar = None
        self.plain = None

    def __enter__(self):
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
