"""Global options shared by every subcommand, and the stdout/stderr output contract.

stdout carries only the result: a rich table for people, exactly one JSON document with
``--json``, only the artifact key(s) with ``-q``. Everything else (progress, logs, hints) goes to
stderr through :func:`log` and ``common.task_progress``, whatever ``-q``/``--json`` say: they
change stdout only. On a terminal progress is a live bar; when stderr is a file or a pipe it is a
plain line every few seconds (``common.PlainProgress``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import typer
from rich.console import Console, RenderableType


@dataclass
class Globals:
    store_path: Path
    """Root of the artifact store."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | xla."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16."""
    seed: int = 0
    """Seed for every random choice a command makes."""
    json: bool = False
    """Print exactly one JSON document on stdout."""
    quiet: bool = False
    """Print only the artifact key(s) on stdout."""
    verbose: bool = False
    """Show debug logs and tracebacks."""
    device_map: str | None = None
    """Spread a large model over devices with accelerate (e.g. auto)."""
    trust_remote_code: bool = False
    """Allow a model repository's own code to run."""

    def store(self):
        from icl_cli.store import Store

        return Store(self.store_path)


_err = Console(stderr=True, highlight=False, soft_wrap=True)


def stderr_console() -> Console:
    return _err


def g(ctx: typer.Context) -> Globals:
    """The Globals of the running command (set by the app callback)."""
    root = ctx.find_root()
    if not isinstance(root.obj, Globals):  # a sub-app invoked on its own in a test
        root.obj = Globals(store_path=Path("artifacts"))
    return root.obj


def log(message: str, *, ctx_globals: Globals | None = None, style: str | None = "dim") -> None:
    """A progress or info line on stderr. -q and --json change stdout only, so they do not silence
    it (``ctx_globals`` is accepted for callers that pass it); ``2>/dev/null`` does."""
    _err.print(message, style=style, markup=False)


def emit(
    gl: Globals,
    data: Any,
    table: Callable[[], RenderableType | Iterable[RenderableType]] | None = None,
    keys: Iterable[str] = (),
) -> None:
    """Write the result of a command to stdout according to the output contract."""
    if gl.json:
        sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
    elif gl.quiet:
        for key in keys:
            sys.stdout.write(f"{key}\n")
    elif table is not None:
        width = Console().width if sys.stdout.isatty() else 160  # files and pipes get whole rows
        out = Console(file=sys.stdout, highlight=False, soft_wrap=False, width=width)
        rendered = table()
        for item in rendered if isinstance(rendered, (list, tuple)) else [rendered]:
            out.print(item)
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
