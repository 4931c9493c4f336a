"""A task-parallel step from the caller's side: resolve ``--shard``/torchrun, run (``shards.run``),
say what happened, and tell the caller what this process reports: the full artifact, a shard's
partial artifact, or nothing (a torchrun rank other than 0).

    rep = run_sharded(store, spec, names, compute, merge, shard="0/4", say=log)
    rep.result      # StepResult of the full artifact, or None
    rep.part        # the partial's JSON document (``shards.part_json``), or None

Library code: it never prints; ``say`` receives the lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from icl_cli.store import shards
from icl_cli.store.keys import StepSpec


@dataclass
class Reported:
    """What this process reports after a sharded step (both None: nothing, a torchrun rank ≠ 0)."""

    result: Any = None
    """StepResult of the full artifact."""
    part: dict | None = None
    """The JSON document of the shard's partial artifact (a shard run outside torchrun)."""


def run_sharded(store, spec: StepSpec, names: Sequence[str], compute: Callable, merge: Callable, *,
                shard: str | None = None, name: str | None = None, force: bool = False,
                say: Callable[[str], None] = lambda m: None) -> Reported:
    """``shards.run`` for ``--shard shard`` (or torchrun's RANK/WORLD_SIZE), then the lines it owes:
    the assembly line, and for a shard the partial it saved or reused."""
    part, torchrun = shards.resolve(shard)
    out = shards.run(store, spec, names, compute, merge, shard=part, torchrun=torchrun, name=name, force=force, say=say)
    if out.line:
        say(out.line)
    if out.result is not None:  # the full artifact (under torchrun rank 0 alone reports it)
        quiet = out.shard is not None and out.shard.index != 0 and torchrun
        return Reported() if quiet else Reported(result=out.result)
    verb = "reused" if out.part.reused else "saved"
    then = "rank 0 assembles" if torchrun else "run the command without --shard once every shard is done to assemble"
    say(f"{verb} partial {out.part.artifact.step} artifact {out.part.artifact.key[:12]} (shard {out.shard}); {then}")
    if torchrun:
        return Reported()  # under torchrun only rank 0 reports
    return Reported(part=shards.part_json(out, names))
