"""The command side of task-parallel sweeps (``--shard i/n``, torchrun): option help and what a
shard prints (see icl_cli/store/sharded.py and shards.py for the mechanism)."""

from __future__ import annotations

from icl_cli.cli.context import Globals, emit

SHARD_HELP = ("i/n: compute only shard i of n (tasks i, i+n, i+2n, … of the list) and publish it as a partial "
              "artifact; the same command without --shard assembles the shards. SLURM: "
              "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; torchrun sets it from RANK/WORLD_SIZE.")
CIRCUIT_SHARD_HELP = ("i/n: compute only the circuits of shard i of n (tasks i, i+n, i+2n, … of the list); without "
                      "--shard every circuit already stored is reused and only the missing ones are computed. SLURM: "
                      "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; torchrun sets it from RANK/WORLD_SIZE.")


def emit_part(gl: Globals, data: dict) -> None:
    """Print a shard's partial artifact (store/shards.py:part_json)."""
    def table():
        from rich.text import Text

        return Text(f"partial {data['step']} {data['key'][:12]}: shard {data['shard']}, {len(data['tasks'])} of "
                    f"{data['n_tasks']} tasks ({', '.join(data['tasks'])}); full key {data['full_key'][:12]}")

    emit(gl, data, table=table, keys=[data["key"]])


def emit_step(gl: Globals, out, table) -> None:
    """Print what a sharded step reports: its full artifact's summary (``out.data``, rendered by
    ``table(out)``), a shard's partial, or nothing (a torchrun rank other than 0)."""
    if out.part is not None:
        emit_part(gl, out.part)
    elif out.result is not None:
        emit(gl, out.data, table=lambda: table(out), keys=[out.result.artifact.key])

