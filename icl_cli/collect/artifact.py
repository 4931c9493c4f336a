"""The torch-free half of collect: its parameters, and reading its artifact for people (flags,
means, the summary).

A reused `icl collect` or `icl clean` works from here, so it costs a file read and not a torch
import. The compute side is :mod:`icl_cli.collect.vectors`, which re-exports these names.

Flags (docs/METHODS.md §4) mark tasks whose numbers would distort means over tasks:

- ``tv_never_helps``: the task vector, added at any swept layer, gives a held-out 0-shot nll ≥
  the plain 0-shot nll. No layer is "best" for such a task.
- ``solved_zero_shot``: the held-out 0-shot nll is below ``SOLVED_NLL`` nats (summed over the
  scored answer tokens): the model already does the task without examples, so a loss delta
  divided by the 0-shot nll blows up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from icl_cli.core.prompts import get_template
from icl_cli.core.errors import IclError

FORMAT_VERSION = 1
"""Format of collect.h5 (in the artifact key)."""
SWEEP_METRICS = ("zero_shot_nll", "zero_shot_acc", "few_shot_nll", "few_shot_acc",
                 "tv_nll", "tv_acc", "tv_replace_nll", "tv_replace_acc")


@dataclass
class CollectParams:
    tasks: str = "all"
    """`all` or a comma-separated list of task names / JSON files."""
    layers: str = "all"
    """`all`, one layer, a range `a-b`, or a list `1,3,5`."""
    n_shot: int = 19
    """Examples per few-shot prompt (paper: 19 for cleaning, 31 for the sweep)."""
    n_prompts: int = 16
    """Few-shot prompts averaged into each task vector (paper: 16)."""
    n_eval: int = 32
    """Held-out prompts for the sweep metrics (paper: 32)."""
    template: str = "paper"
    """paper | hendel | todd."""
    n_first: int = 2
    """Answer tokens scored by nll (paper: 2)."""
    seed: int = 0
    """Seed of the split and of prompt sampling."""

    def __post_init__(self) -> None:
        get_template(self.template)
        if self.n_prompts < 1 or self.n_eval < 1 or self.n_first < 1:
            raise IclError("--n-prompts, --n-eval and --n-first must be ≥ 1")


SOLVED_NLL = 0.05
"""A task is solved at 0 shots below this held-out 0-shot nll: the answer tokens together get
probability ≥ e^−0.05 ≈ 0.95."""
FLAGS = {
    "tv_never_helps": "the task vector does not lower the 0-shot nll at any layer",
    "solved_zero_shot": f"solved at 0 shots (0-shot nll < {SOLVED_NLL})",
}
"""Flag name -> what it means, for people."""
SHORT = {"tv_never_helps": "TV never helps", "solved_zero_shot": "0-shot solved"}


def task_flags(sweep: dict[str, Any]) -> list[str]:
    """The flags of one task from its sweep (``zero_shot_nll`` scalar, ``tv_nll`` per layer)."""
    flags = []
    tv = sweep["tv_nll"]
    tv = list(tv) if isinstance(tv, (list, tuple)) else [tv]
    if min(tv) >= sweep["zero_shot_nll"]:
        flags.append("tv_never_helps")
    if sweep["zero_shot_nll"] < SOLVED_NLL:
        flags.append("solved_zero_shot")
    return flags


def flagged(flags: dict[str, list[str]]) -> dict[str, list[str]]:
    """Flag name -> the tasks that carry it (every flag present, possibly empty)."""
    return {f: [t for t, fs in flags.items() if f in fs] for f in FLAGS}


def mean(values: Sequence[float]) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


@dataclass
class SweepResult:
    """The part of a collect task result that summaries read (``mass`` rows as numpy arrays)."""

    sweep: dict[str, Any]
    best_layer: int
    mass: dict[str, Any] = field(default_factory=dict)


def read_sweeps(path, with_mass: bool = True) -> tuple[list[int], dict[str, SweepResult]]:
    """(layers, task -> SweepResult) of a collect.h5, read with h5py alone."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            layers = [int(x) for x in f["layers"][()]]
            out = {}
            for name, g in f["tasks"].items():
                sweep = {k: (v[()].tolist() if v.shape else float(v[()])) for k, v in g["sweep"].items()}
                mass = {k: v[()] for k, v in g["mass"].items()} if with_mass and "mass" in g else {}
                out[name] = SweepResult(sweep, int(g.attrs["best_layer"]), mass)
    except (OSError, KeyError) as exc:
        raise IclError(f"{path} is not a readable collect artifact ({exc}); run `icl store verify`") from None
    return layers, out


def mass_percent(mass, features: Sequence[int] | None = None) -> dict[str, float]:
    """Percentage of the activation of ``features`` (default: all) that falls on each role (METHODS §8).

    mass: [1 + n_roles, d_sae] (torch or numpy), row 0 = tokens with no role."""
    from icl_cli.core.prompts import ROLES

    m = mass if features is None else mass[:, list(features)]
    per_role = m.sum(-1)
    total = float(per_role.sum()) or 1.0
    return {role: 100 * float(v) / total for role, v in zip(("none",) + ROLES, per_role)}


_METRICS = ("zero_shot_nll", "zero_shot_acc", "few_shot_nll", "few_shot_acc")
_PER_LAYER = ("tv_nll", "tv_acc", "tv_replace_nll", "tv_replace_acc")


def _means(results: dict, names: Sequence[str], layers: Sequence[int]) -> dict[str, Any]:
    rs = [results[n] for n in names]
    out: dict[str, Any] = {"n_tasks": len(rs)}
    for k in _METRICS:
        out[k] = mean([r.sweep[k] for r in rs])
    for k in _PER_LAYER:
        out[k] = {str(l): mean([r.sweep[k][j] for r in rs]) for j, l in enumerate(layers)}
    return out


def summary_json(key: str, layers: Sequence[int], results: dict) -> dict:
    """The collect result as one JSON document: per task and layer, flags, means with and without
    flagged tasks, and the overall best layer (the most common best layer of unflagged tasks).

    ``results``: task -> an object with ``sweep``, ``best_layer`` and ``mass`` (TaskResult or SweepResult)."""
    out = {}
    flags = {}
    for name, r in results.items():
        rows = {}
        for j, l in enumerate(layers):
            rows[str(l)] = {"zero_shot_nll": r.sweep["zero_shot_nll"], "tv_nll": r.sweep["tv_nll"][j],
                            "tv_replace_nll": r.sweep["tv_replace_nll"][j], "few_shot_nll": r.sweep["few_shot_nll"],
                            "zero_shot_acc": r.sweep["zero_shot_acc"], "tv_acc": r.sweep["tv_acc"][j],
                            "tv_replace_acc": r.sweep["tv_replace_acc"][j], "few_shot_acc": r.sweep["few_shot_acc"]}
        flags[name] = task_flags(r.sweep)
        out[name] = {"best_layer": r.best_layer, "tv_helps": "tv_never_helps" not in flags[name],
                     "flags": flags[name], "layers": rows}
        if r.mass:
            out[name]["mass_pct"] = {k: mass_percent(m) for k, m in r.mass.items()}
    clean = [t for t, fs in flags.items() if not fs]
    votes = Counter(results[t].best_layer for t in clean)
    best = min(votes, key=lambda l: (-votes[l], l)) if votes else None
    return {"key": key, "layers": list(layers), "best_layer": best, "solved_nll_threshold": SOLVED_NLL,
            "flags": {f: FLAGS[f] for f in FLAGS}, "flagged": flagged(flags),
            "mean": {"all": _means(results, list(results), layers), "unflagged": _means(results, clean, layers)},
            "tasks": out}


def flag_parts(flagged_tasks: dict[str, list[str]]) -> str:
    """'TV never helps: a, b; 0-shot solved (nll < 0.05): c' for the flags that have tasks."""
    label = {"solved_zero_shot": f"{SHORT['solved_zero_shot']} (nll < {SOLVED_NLL})"}
    return "; ".join(f"{label.get(f, SHORT[f])}: {', '.join(ts)}" for f, ts in flagged_tasks.items() if ts)


def flag_note(data: dict) -> str:
    """One line naming the flagged tasks of a summary, or '' when none is flagged."""
    n = len({t for ts in data["flagged"].values() for t in ts})
    if not n:
        return ""
    return f"flagged {n} of {len(data['tasks'])} tasks — {flag_parts(data['flagged'])}"
