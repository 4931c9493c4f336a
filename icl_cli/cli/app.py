"""The ``icl`` command: global options, subcommand registry and the one error boundary.

    icl --help
    icl store ls
    icl --json tasks ls
    icl tasks ls --json                 # global options may also follow the subcommand

Heavy libraries (torch, transformers, sae_lens) are imported only inside the commands that need
them, so ``icl --help`` stays fast.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional


def _interrupted_before_start(kind, value, tb, _previous=sys.excepthook) -> None:
    """Ctrl-C while the commands are still being imported: one line and exit 130, no traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write("interrupted; nothing was written to the store\n")
        sys.stderr.flush()
        os._exit(getattr(value, "exit_code", 130))
    _previous(kind, value, tb)


_excepthook = sys.excepthook
sys.excepthook = _interrupted_before_start  # until the commands are imported (restored below)

import typer  # noqa: E402
from typer import _click as click  # typer vendors click; its exceptions are these
from typer.core import TyperGroup, TyperOption

from icl_cli import __version__  # noqa: E402
from icl_cli.cli.context import Globals, stderr_console  # noqa: E402
from icl_cli.core.errors import IclError  # noqa: E402


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C: the store's cleanup runs (the
    staging folder is deleted, the key's lock released) and the command exits 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _terminate(signum: int, frame) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):  # once: a second signal must not cut the cleanup short
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def _handle_termination() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)


class _Boundary(TyperGroup):
    """Root group that turns domain errors into one line on stderr and an exit code, and accepts
    global options after the subcommand too (argv.py). ``--help`` lists the commands in the order
    of the workflow (_SUBCOMMANDS)."""

    def list_commands(self, ctx):  # noqa: D401 - click API
        order = {name: k for k, (_, name) in enumerate(_SUBCOMMANDS)}
        return sorted(super().list_commands(ctx), key=lambda n: order.get(n, len(order)))

    def parse_args(self, ctx, args):  # noqa: D401 - click API
        from icl_cli.cli.argv import hoist_globals

        return super().parse_args(ctx, hoist_globals(self, ctx, list(args)))

    def make_context(self, info_name, args, parent=None, **extra):  # noqa: D401 - click API
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.ClickException as exc:
            _usage(exc)

    def invoke(self, ctx):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except IclError as exc:
            _report(ctx, exc, exc.exit_code)
        except KeyboardInterrupt as exc:
            what = f"terminated ({exc})" if isinstance(exc, Terminated) else "interrupted"
            stderr_console().print(f"{what}; nothing partial was written to the store", style="red")
            ctx.exit(getattr(exc, "exit_code", 130))
        except click.exceptions.ClickException as exc:  # usage errors of a subcommand (exit 2)
            _usage(exc)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: no traceback unless -v
            known = _environment_or_damage(ctx, exc)
            if known is not None:
                _report(ctx, IclError(known[1]), known[0])
            _report(ctx, exc, 1, internal=True)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _environment_or_damage(ctx, exc: Exception) -> "tuple[int, str] | None":
    """(exit code, one line) for a failure of the machine (a full disk: 1) or of a data file (a
    damaged or missing file: 3) that escaped the library as a plain exception; None otherwise."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        where = f" writing {exc.filename}" if exc.filename else ""
        return 1, f"no space left on the device{where}; free some space (e.g. `icl store gc`) or use --store on a larger disk"
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and exc.filename:
        return 1, f"cannot write {exc.filename} ({exc.strerror}); check the permissions of the store (--store)"
    name = type(exc).__name__
    message = " ".join(str(exc).split()) or name
    store = getattr(ctx.obj, "store_path", None)
    in_store = bool(getattr(exc, "filename", None)) and store is not None and \
        Path(exc.filename).absolute().is_relative_to(Path(store).expanduser().absolute())
    if isinstance(exc, FileNotFoundError) and in_store:
        return 3, f"the store lost {exc.filename}; run `icl store verify --all` and rebuild what it names"
    if name == "SafetensorError" or name == "HeaderTooLarge":
        return 3, f"a safetensors file is damaged or truncated ({message}); run `icl store verify --all` or replace the file"
    if isinstance(exc, (OSError, RuntimeError, KeyError, ValueError)) and _raised_in(exc, "h5py"):
        return 3, f"an HDF5 file is damaged or truncated ({message}); run `icl store verify --all` or replace the file"
    return None


def _raised_in(exc: BaseException, package: str) -> bool:
    """Whether the innermost Python frames that raised ``exc`` belong to ``package``."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and package in Path(last.tb_frame.f_code.co_filename).parts


def _switch_type(self, ctx):
    """No value type after a boolean switch in --help (``--json``, not ``--json <bool>``)."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _switch_type


def _usage(exc: "click.exceptions.ClickException") -> None:
    """A usage error as one line on stderr (not click's usage box), then exit with its code (2)."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        raise exc  # `icl` or `icl store` alone: click prints the help
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    stderr_console().print(f"error: {message}{hint}", style="red", markup=False, highlight=False)
    raise typer.Exit(exc.exit_code)


def _report(ctx, exc: BaseException, code: int, internal: bool = False) -> None:
    verbose = isinstance(ctx.obj, Globals) and ctx.obj.verbose
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if internal:
        message = f"internal error: {type(exc).__name__}: {message}" + ("" if verbose else " (run with -v for the traceback)")
    stderr_console().print(f"error: {message}", style="red", markup=False, highlight=False)
    ctx.exit(code)


app = typer.Typer(
    cls=_Boundary,
    name="icl",
    help="Sparse feature circuits for in-context learning (Kharlapenko et al., ICML 2025).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"icl {__version__}")
        raise typer.Exit()


@app.callback()
def _globals(
    ctx: typer.Context,
    store: Path = typer.Option(Path("artifacts"), "--store", envvar="ICL_STORE", help="Artifact store directory."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N] | xla."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16."),
    seed: int = typer.Option(0, "--seed", help="Seed for every random choice."),
    json_out: bool = typer.Option(False, "--json", help="Print exactly one JSON document on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Print only artifact key(s) on stdout."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logs and tracebacks."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Spread a large model over GPUs with accelerate (auto)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a model repository's own code to run."),
    threads: Optional[str] = typer.Option(
        None, "--threads", envvar="ICL_THREADS", metavar="N",
        help="CPU threads for torch (default: the CPUs available to this process: affinity and cgroup quota)."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    from icl_cli.core.gguf import use_store
    from icl_cli.core.threads import configure_threads

    configure_threads(threads)  # before any command imports torch
    use_store(store)  # GGUF checkpoints are converted into this store
    ctx.obj = Globals(store_path=store, device=device, dtype=dtype, seed=seed, json=json_out, quiet=quiet, verbose=verbose,
                      device_map=device_map, trust_remote_code=trust_remote_code)


def _register() -> None:
    """Attach every subcommand module (each one small: parse, call the library, render)."""
    import importlib

    for module, name in _SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"icl_cli.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"icl_cli.cli.{module}":
                continue  # not written yet
            raise
        if hasattr(mod, "app"):
            app.add_typer(mod.app, name=name)
        else:
            mod.register(app)


# (module in icl_cli.cli, sub-app name), in the order of the workflow (what --help lists): the
# whole pipeline, its steps as the paper runs them, then the store and the catalogues. A module
# exposes either `app` (a Typer group) or `register(app)` (adds plain commands).
_SUBCOMMANDS = [
    ("pipeline_cmd", "pipeline"),
    ("collect_cmd", "collect"),
    ("train_sae_cmd", "train-sae"),
    ("clean_cmd", "clean"),
    ("steer_cmd", "steer"),
    ("ablate_cmd", "ablate"),
    ("circuit_cmd", "circuit"),
    ("report_cmd", "report"),
    ("store_cmd", "store"),
    ("models_cmd", "models"),
    ("tasks_cmd", "tasks"),
    ("zoo_cmd", "zoo"),
]

_register()
sys.excepthook = _excepthook  # importing this module leaves an interactive session's hook alone


def main() -> None:
    sys.excepthook = _interrupted_before_start  # the `icl` process: no traceback for Ctrl-C anywhere
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _handle_termination()
    app()


if __name__ == "__main__":
    main()
