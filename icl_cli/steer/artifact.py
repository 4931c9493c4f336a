"""The steer artifact (``steer.h5``) and a task's row, read and written (the layout is in
:mod:`icl_cli.steer.heatmaps`'s docstring; :mod:`icl_cli.steer.heatmaps` re-exports these names).

    r = read_h5(art.file("steer.h5"))     # SteerResult
    with st.h5("steer.h5") as f: write_h5(f, r)
    merge_rows(parts, names)               # task -> Cells from partial artifacts (task-parallel sweeps)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from icl_cli.core.errors import IclError


class Cells(NamedTuple):
    """One task's row: nll and acc per edit ([K]) and unsteered."""

    nll: Tensor
    acc: Tensor
    base_nll: float
    base_acc: float


@dataclass
class SteerResult:
    mode: str
    layer: int
    model: str
    tasks: list[str]
    features: list[int]
    nll: Tensor  # [T, F] (executor/detector) or [T, F, S] (negative)
    acc: Tensor  # same shape
    base_nll: Tensor  # [T]
    base_acc: Tensor  # [T]
    kept: dict[str, list[int]] = field(default_factory=dict)
    selected: dict[str, list[int]] = field(default_factory=dict)
    scale: float = float("nan")
    effect: Tensor | None = None  # [T, F]
    scales: Tensor | None = None  # [S]
    min_effect: float = float("nan")
    max_other: float = float("nan")
    rule: str = "strict"  # executor rule (artifacts before format 2: strict)


def save_cells(c: Cells, path) -> None:
    """One finished task's row as JSON, atomically (resuming an interrupted run); no-op for path None."""
    if path is None:
        return
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"nll": c.nll.tolist(), "acc": c.acc.tolist(), "base_nll": c.base_nll, "base_acc": c.base_acc}, fh)
    os.replace(tmp, path)


def load_cells(path) -> Cells | None:
    """The row save_cells wrote, or None when there is none or it is damaged."""
    if path is None or not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        return Cells(torch.tensor(d["nll"]), torch.tensor(d["acc"]), float(d["base_nll"]), float(d["base_acc"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_h5(f, r: SteerResult) -> None:
    """The layout of the module docstring."""
    import h5py

    f.attrs["mode"] = r.mode
    f.attrs["layer"] = r.layer
    f.attrs["model"] = r.model
    f.attrs["min_effect"] = r.min_effect
    f.attrs["max_other"] = r.max_other
    f.attrs["rule"] = r.rule
    if r.mode != "negative":
        f.attrs["scale"] = r.scale
    f.create_dataset("tasks", data=r.tasks, dtype=h5py.string_dtype("utf-8"))
    f.create_dataset("features", data=torch.tensor(r.features, dtype=torch.long).numpy().reshape(-1))
    for name in ("nll", "acc", "base_nll", "base_acc", "effect", "scales"):
        v = getattr(r, name)
        if v is not None:
            f.create_dataset(name, data=v.float().numpy())
    for group, d in (("kept", r.kept), ("selected", r.selected)):
        g = f.create_group(group)
        for t, ids in d.items():
            g.create_dataset(t, data=torch.tensor(ids, dtype=torch.long).numpy().reshape(-1))


def read_h5(path) -> SteerResult:
    """A steer artifact's ``steer.h5`` back as a SteerResult (IclError when it is not one)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            get = lambda k: torch.from_numpy(f[k][()]) if k in f else None  # noqa: E731
            a = f.attrs
            return SteerResult(
                mode=str(a["mode"]), layer=int(a["layer"]), model=str(a.get("model", "")),
                tasks=[t.decode() if isinstance(t, bytes) else str(t) for t in f["tasks"][()]],
                features=[int(x) for x in f["features"][()]],
                nll=get("nll"), acc=get("acc"), base_nll=get("base_nll"), base_acc=get("base_acc"),
                kept={t: [int(x) for x in v[()]] for t, v in f["kept"].items()},
                selected={t: [int(x) for x in v[()]] for t, v in f["selected"].items()},
                scale=float(a.get("scale", float("nan"))), effect=get("effect"), scales=get("scales"),
                min_effect=float(a.get("min_effect", float("nan"))), max_other=float(a.get("max_other", float("nan"))),
                rule=str(a.get("rule", "strict")))
    except (OSError, KeyError) as exc:
        raise IclError(f"{path} is not a readable steer artifact ({exc}); run `icl store verify`") from None


def task_rows(r: SteerResult) -> dict[str, Cells]:
    """task -> its Cells (nll/acc rows [F] or [S], base nll/acc) of a steer result."""
    return {t: Cells(r.nll[i], r.acc[i], float(r.base_nll[i]), float(r.base_acc[i])) for i, t in enumerate(r.tasks)}


def merge_rows(results: Sequence[SteerResult], names: Sequence[str]) -> list[Cells]:
    """The rows of ``names`` in that order, taken from several (partial) steer results."""
    rows: dict[str, Cells] = {}
    for r in results:
        rows.update(task_rows(r))
    lost = [t for t in names if t not in rows]
    if lost:
        raise IclError(f"the partial steer artifacts hold no row for {', '.join(lost)}; recompute their shards")
    return [rows[t] for t in names]
