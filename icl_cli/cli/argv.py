"""Global options anywhere on the line: `icl tasks ls --json` means `icl --json tasks ls`.

    hoist_globals(root, ctx, ["collect", "--tasks", "antonyms", "-q"])
    -> ["-q", "collect", "--tasks", "antonyms"]

Global options (``--store``, ``--json``, ``-q``, ...) belong to the root command, so click accepts
them only before the subcommand. Users put output flags at the end, so the root moves every global
option it finds after the subcommand (with its value) to just before the subcommand, then parses
as usual. The scan walks the command path as click will: it knows each command's own options and
skips their values (so ``--name -q`` keeps ``-q`` as the name), a subcommand's own option of the
same name wins over the global one, and nothing after ``--`` moves.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperGroup, TyperOption


def _options(cmd: Any) -> dict[str, bool]:
    """Option name -> whether it takes a value, for the options ``cmd`` declares itself."""
    out: dict[str, bool] = {}
    for p in cmd.params:
        if isinstance(p, TyperOption):
            takes_value = not (p.is_flag or p.count)
            for name in [*p.opts, *p.secondary_opts]:
                out[name] = takes_value
    return out


def _split(token: str) -> tuple[str, bool]:
    """(option name, value attached with '=')."""
    if token.startswith("--") and "=" in token:
        return token.split("=", 1)[0], True
    return token, False


def hoist_globals(root: TyperGroup, ctx: Any, args: list[str]) -> list[str]:
    """``args`` with the root's options that follow a subcommand moved in front of it."""
    globals_ = {k: v for k, v in _options(root).items() if k not in ("--version",)}
    kept: list[str] = []
    moved: list[str] = []
    insert_at: int | None = None  # where the first subcommand name sits in `kept`
    cmd: Any = root
    own = _options(root)
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            kept += args[i:]
            break
        if tok.startswith("-") and len(tok) > 1:
            name, attached = _split(tok)
            if cmd is not root and name not in own and name in globals_:
                n = 2 if globals_[name] and not attached else 1
                moved += args[i : i + n]
            else:
                n = 2 if own.get(name) and not attached else 1
                kept += args[i : i + n]
            i += n
            continue
        if isinstance(cmd, TyperGroup):  # a subcommand name
            sub = cmd.get_command(ctx, tok)
            if sub is None:
                kept += args[i:]  # unknown: click reports it
                break
            if insert_at is None:
                insert_at = len(kept)
            cmd, own = sub, _options(sub)
        kept.append(tok)
        i += 1
    if not moved or insert_at is None:
        return args
    return kept[:insert_at] + moved + kept[insert_at:]
