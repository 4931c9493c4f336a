"""Task-parallel sweeps: ``--shard i/n`` (SLURM job arrays) and torchrun for collect, clean and steer.

    icl collect --tasks all --shard 0/4      # in each of 4 jobs: publishes a partial artifact
    icl collect --tasks all                  # afterwards: assembles the 4 partials, recomputes nothing

How the tasks are split: shard i of n takes ``tasks[i::n]`` (round robin over the full task
list). Round robin spreads tasks of one kind (built-in tasks come grouped) over the shards.

A partial artifact is an artifact of step ``<step>.part`` (``collect.part``, ``clean.part``,
``steer.part``). Its hashed parameters are the full step's hashed parameters plus ``full_key``
(the key the full artifact has), ``shard`` (i), ``shards`` (n) and ``shard_tasks`` (its task
names); its inputs are the full step's inputs. Its files have the full artifact's layout,
restricted to its tasks (cross-task figures in them are not used).

Assembly: the command without ``--shard`` finds the partials whose ``full_key`` is its own key.
It picks a complete set (every shard of one count n); with one count present and shards
missing, it computes the missing shards first (as partials). It verifies each partial (file
hashes), merges their per-task data in the full task order, and recomputes the cross-task
figures from the merged data. The full artifact gets the same key as an unsharded run; its
manifest's metrics list the partial keys under ``assembled_from``.

Under torchrun (WORLD_SIZE > 1) rank r runs shard r/WORLD_SIZE, and rank 0 then polls the
store until every partial is there (``ICL_SHARD_TIMEOUT`` seconds, default 86400) and assembles.
The store must be on a file system every rank can read.

Library code: it never prints; ``say`` receives the progress lines.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from icl_cli.core.errors import IclError, IntegrityError
from icl_cli.store import StepSpec

PART_SUFFIX = ".part"
POLL_S = 2.0


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 ≤ index < count)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def tasks(self, names: Sequence[str]) -> list[str]:
        """This shard's tasks: names[index::count]."""
        return list(names)[self.index :: self.count]


def parse_shard(text: str) -> Shard:
    """``"i/n"`` -> Shard; IclError on anything else or i ≥ n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise IclError(f"--shard takes i/n (shard i of n, 0 ≤ i < n, e.g. 0/4 or "
                       f"${{SLURM_ARRAY_TASK_ID}}/${{SLURM_ARRAY_TASK_COUNT}}), not {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise IclError(f"--shard {text}: the number of shards must be ≥ 1")
    if i >= n:
        raise IclError(f"--shard {text}: the shard index must be below the number of shards (0-{n - 1})")
    return Shard(i, n)


def env_shard() -> Shard | None:
    """Shard RANK/WORLD_SIZE under torchrun (WORLD_SIZE > 1), else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise IclError("RANK and WORLD_SIZE must be integers (set by torchrun)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise IclError(f"RANK {rank} is outside 0-{world - 1} (WORLD_SIZE {world})")
    return Shard(rank, world)


def resolve(text: str | None) -> tuple[Shard | None, bool]:
    """(this process's shard, launched by torchrun) from --shard or RANK/WORLD_SIZE."""
    env = env_shard()
    given = parse_shard(text) if text is not None else env
    if env is not None:
        if given != env:
            raise IclError(f"--shard {given} contradicts torchrun's RANK/WORLD_SIZE ({env}); leave --shard out under torchrun")
        use_local_gpu()
    return given, env is not None


def use_local_gpu() -> None:
    """Under torchrun on GPUs each process uses cuda:LOCAL_RANK (what "cuda" means for it), so
    the ranks of one node do not all load their model on GPU 0."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def check_count(shard: Shard, names: Sequence[str]) -> None:
    """More shards than tasks would leave shards without work: a one-line error naming them."""
    if shard.count > len(names):
        empty = [f"{i}/{shard.count}" for i in range(len(names), shard.count)]
        raise IclError(f"{shard.count} shards for {len(names)} task(s): shard(s) {', '.join(empty)} would have no task; "
                       f"use at most {len(names)} shards")


def part_spec(spec: StepSpec, shard: Shard, names: Sequence[str]) -> StepSpec:
    """The spec of shard ``shard``'s partial artifact of the (bound) full ``spec``."""
    params = {**spec.params, "full_key": spec.key, "shard": shard.index, "shards": shard.count,
              "shard_tasks": shard.tasks(names)}
    return StepSpec(spec.step + PART_SUFFIX, params, dict(spec.inputs), spec.version)


def find_parts(store, spec: StepSpec) -> dict[int, dict[int, Any]]:
    """count n -> {shard index -> Artifact} of the partials of the full (bound) ``spec``."""
    out: dict[int, dict[int, Any]] = {}
    for art in store.artifacts(step=spec.step + PART_SUFFIX):
        p = art.params
        if p.get("full_key") == spec.key:
            out.setdefault(int(p["shards"]), {})[int(p["shard"])] = art
    return out


def missing_text(count: int, have: Mapping[int, Any]) -> str:
    return ", ".join(f"{i}/{count}" for i in range(count) if i not in have)


def choose(parts: dict[int, dict[int, Any]]) -> tuple[int, list[int]]:
    """(count n, missing shard indices) of the set to assemble: a complete set if there is one
    (the smallest n), else the only count present; IclError when several incomplete counts are mixed."""
    complete = sorted(n for n, have in parts.items() if len(have) == n)
    if complete:
        return complete[0], []
    if len(parts) == 1:
        n, have = next(iter(parts.items()))
        return n, [i for i in range(n) if i not in have]
    sets = "; ".join(f"{n} shards: missing {missing_text(n, have)}" for n, have in sorted(parts.items()))
    raise IclError(f"partial artifacts of several shard counts are in the store and none is complete ({sets}); "
                   "run the missing shards of one count with --shard i/n, then assemble")


def verified(art, shard: str) -> Any:
    """``art`` after re-hashing its files; IclError naming the shard on damage."""
    try:
        return art.verify()
    except IntegrityError as exc:
        raise IclError(f"partial {shard} ({art.key[:12]}) fails verification ({exc}); recompute it with "
                       f"--shard {shard} --force, then assemble again") from None


def poll(missing: Callable[[], str], say: Callable[[str], None], waiting: str, late: str,
         timeout: float | None = None) -> None:
    """Call ``missing()`` every POLL_S seconds until it returns "" (what other ranks still owe);
    say ``waiting.format(left)`` when that changes, and raise IclError(``late.format(left, timeout)``)
    after ``timeout`` seconds (default ICL_SHARD_TIMEOUT, one day)."""
    timeout = float(os.environ.get("ICL_SHARD_TIMEOUT", "86400")) if timeout is None else timeout
    start, told = time.monotonic(), None
    while True:
        left = missing()
        if not left:
            return
        if left != told:
            say(waiting.format(left))
            told = left
        if time.monotonic() - start > timeout:
            raise IclError(late.format(left, timeout))
        time.sleep(POLL_S)


def wait_for(store, spec: StepSpec, count: int, say: Callable[[str], None], timeout: float | None = None) -> None:
    """Poll the store until all ``count`` partials of ``spec`` exist (rank 0 under torchrun)."""
    def missing() -> str:
        have = find_parts(store, spec).get(count, {})
        return "" if len(have) == count else missing_text(count, have)

    poll(missing, say, f"waiting for shard(s) {{}} of {spec.step}",
         f"shard(s) {{}} of {spec.step} did not appear within {{:.0f}} s (ICL_SHARD_TIMEOUT); "
         "check those ranks' logs, then run the command without --shard to assemble", timeout)


@dataclass
class Outcome:
    """What ``run`` did: the full artifact's StepResult (None for a shard that does not assemble),
    or the partial's StepResult, and a summary line."""

    result: Any = None
    part: Any = None
    shard: Shard | None = None
    line: str = ""


def run(store, spec: StepSpec, names: Sequence[str], compute: Callable, merge: Callable, *,
        shard: Shard | None = None, torchrun: bool = False, name: str | None = None, force: bool = False,
        say: Callable[[str], None] = lambda m: None) -> Outcome:
    """Compute, reuse or assemble a step over ``names`` (the full task list, in order).

    compute(st, task_names) -> metrics: writes the step's files for those tasks into staging ``st``
      (used for the unsharded artifact, and for each partial).
    merge(st, parts) -> metrics: writes the full files from ``parts`` (list of (task names, Artifact)
      in shard order) without computing anything.
    shard: this process's shard (from --shard or torchrun); torchrun: rank 0 assembles after all ranks.
    """
    spec = store.bind(spec)
    if shard is not None:
        check_count(shard, names)
        if not force and store.get(spec.key) is not None:
            say(f"{spec.step} {spec.key[:12]} is complete already: shard {shard} has nothing to compute")
            return Outcome(result=store.run(spec, lambda st: compute(st, list(names)), name=name, log=say), shard=shard)
        mine = shard.tasks(names)
        say(f"shard {shard}: {len(mine)} of {len(names)} tasks ({', '.join(mine)})")
        part = store.run(part_spec(spec, shard, names), lambda st: compute(st, mine), force=force, log=say)
        if not (torchrun and shard.index == 0):
            return Outcome(part=part, shard=shard)
        wait_for(store, spec, shard.count, say)  # then rank 0 assembles (again, after a forced run)
    elif not force and store.get(spec.key) is not None:
        return Outcome(result=store.run(spec, lambda st: compute(st, list(names)), name=name, log=say))
    parts = {} if (force and shard is None) else find_parts(store, spec)
    if not parts:
        return Outcome(result=store.run(spec, lambda st: compute(st, list(names)), name=name, force=force, log=say))
    count, missing = choose(parts)
    if shard is not None:
        count, missing = shard.count, []
    computed = 0
    for i in missing:
        sh = Shard(i, count)
        check_count(sh, names)
        mine = sh.tasks(names)
        say(f"shard {sh} is missing: computing its {len(mine)} task(s) ({', '.join(mine)})")
        store.run(part_spec(spec, sh, names), lambda st, mine=mine: compute(st, mine), log=say)
        computed += len(mine)
    have = find_parts(store, spec)[count]
    ordered = []
    for i in range(count):
        art = verified(have[i], f"{i}/{count}")
        expect = Shard(i, count).tasks(names)
        if list(art.params.get("shard_tasks", [])) != expect:
            raise IclError(f"partial {i}/{count} ({art.key[:12]}) holds tasks {art.params.get('shard_tasks')}, "
                           f"not {expect}; recompute it with --shard {i}/{count} --force")
        ordered.append((expect, art))
    say(f"assembling {count} shard(s) of {spec.step} ({len(names)} tasks)")

    def build(st):
        metrics = dict(merge(st, ordered) or {})
        metrics["assembled_from"] = {"shards": count, "parts": [a.key for _, a in ordered]}
        return metrics

    res = store.run(spec, build, name=name, force=force, log=say)
    done = "nothing recomputed" if not computed else f"{computed} task(s) of missing shards computed here"
    line = (f"assembled {count} shards, {len(names)} tasks, {done}" if not res.reused
            else f"reused {spec.step} {res.artifact.key[:12]}")
    return Outcome(result=res, line=line)


def part_json(out: Outcome, names: Sequence[str]) -> dict:
    """The --json document of a shard run (its partial artifact)."""
    art = out.part.artifact
    return {"key": art.key, "step": art.step, "shard": str(out.shard), "full_key": art.params["full_key"],
            "tasks": list(art.params["shard_tasks"]), "n_tasks": len(names), "reused": out.part.reused}
