"""The command side of task-parallel sweeps (``--shard i/n``, torchrun): option help, stderr lines,
and what a shard prints (see icl_cli/store/shards.py for the mechanism)."""

from __future__ import annotations

from typing import Sequence

from icl_cli.cli.context import emit, log

SHARD_HELP = ("i/n: compute only shard i of n (tasks i, i+n, i+2n, … of the list) and publish it as a partial "
              "artifact; the same command without --shard assembles the shards. SLURM: "
              "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; torchrun sets it from RANK/WORLD_SIZE.")
CIRCUIT_SHARD_HELP = ("i/n: compute only the circuits of shard i of n (tasks i, i+n, i+2n, … of the list); without "
                      "--shard every circuit already stored is reused and only the missing ones are computed. SLURM: "
                      "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; torchrun sets it from RANK/WORLD_SIZE.")


def finish(gl, out, names: Sequence[str]) -> bool:
    """Say what a sharded run did; emit a shard's partial. True when the caller emits the full result."""
    from icl_cli.store.shards import part_json

    if out.line:
        log(out.line, ctx_globals=gl)
    if out.result is not None:  # the full artifact (under torchrun rank 0 alone prints it)
        return not (out.shard is not None and out.shard.index != 0 and _torchrun_rank())
    verb = "reused" if out.part.reused else "saved"
    torchrun = _torchrun_rank()
    then = "rank 0 assembles" if torchrun else "run the command without --shard once every shard is done to assemble"
    log(f"{verb} partial {out.part.artifact.step} artifact {out.part.artifact.key[:12]} (shard {out.shard}); {then}",
        ctx_globals=gl)
    if torchrun:
        return False  # under torchrun only rank 0 prints
    data = part_json(out, names)

    def table():
        from rich.text import Text

        return Text(f"partial {data['step']} {data['key'][:12]}: shard {data['shard']}, {len(data['tasks'])} of "
                    f"{data['n_tasks']} tasks ({', '.join(data['tasks'])}); full key {data['full_key'][:12]}")

    emit(gl, data, table=table, keys=[data["key"]])
    return False


def _torchrun_rank() -> bool:
    from icl_cli.store.shards import env_shard

    return env_shard() is not None
