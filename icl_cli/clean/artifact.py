"""The clean artifact: its per-task result, HDF5 layout and the summary people read (no torch).

HDF5 layout (``clean.h5``)::

    attrs  layer, l1 ("auto" or the λ as text), l1_tolerance, l1_slack, sae (key or reference), sae_label, detectors
    /tasks/<t>/features [K] int64, weights [K] float32   kept SAE features, strongest first
    /tasks/<t>/l0/<m>, nll/<m>, acc/<m>                  per method m (see METHOD_NAMES)
    /tasks/<t>/sweep/{l1, l0, nll}                       --sweep-l1 runs (held-out nll)
    /tasks/<t>/auto/{l1, l0, val_nll}, attrs val_nll_tv, limit, passed   the λs --l1 auto tried
    /tasks/<t> attrs steps, l1 (the λ used), flags (JSON list, see collect_io.FLAGS)

A reused `icl clean` renders from here without importing torch.
"""

from __future__ import annotations

import math

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from icl_cli.collect.artifact import FLAGS, SHORT, SOLVED_NLL, flag_parts, flagged  # noqa: F401 (SHORT re-exported)
from icl_cli.core.errors import IclError

FORMAT_VERSION = 3  # 2: λ per task (--l1 auto), flags, SAE named; 3: each task's λ search starts at the grid's top, not at the previous task's λ
BASE_METHODS = ("zero_shot", "tv", "recon")
PAPER_L1 = 0.05
"""The paper's λ, for its Gemma-1 SAEs."""
AUTO_L1_GRID = (0.1, 0.05, 0.025, 0.01, 0.005, 0.0025, 0.001, 1e-4, 1e-5)
"""λs --l1 auto tries, largest first: the paper's sweep with 5e-3 and 2.5e-3 added."""


@dataclass
class CleanParams:
    l1: float | None = PAPER_L1
    """λ of the L1 penalty on the SAE activations (paper: 0.05, for its SAEs' activation scale);
    None = auto (the default of `icl clean --l1`): per task, the largest λ of ``l1_grid`` whose
    cleaned vector keeps the validation nll within ``l1_tolerance`` of the raw vector's."""
    l1_grid: tuple[float, ...] = AUTO_L1_GRID
    """λs tried by --l1 auto; the largest that passes is kept."""
    l1_start: float = 0.01
    """--l1 auto: the grid λ each task's search starts from (the nearest grid value in log scale).
    The same for every task, so a task's λ never depends on the tasks cleaned before it (or on
    sharding); starting near where tasks land costs about two cleanings a task, not a walk down
    the whole grid."""
    l1_tolerance: float = 0.1
    """--l1 auto accepts a λ when validation nll ≤ (1 + tolerance) × the raw vector's + slack."""
    l1_slack: float = 0.01
    """--l1 auto: nats always allowed on top (on 24 prompts, smaller differences are noise; it
    matters for tasks whose nll is near 0)."""
    n_val: int = 24
    """Validation prompts of --l1 auto: 0-shot prompts whose queries are training pairs that no
    training prompt asks (so neither the held-out pairs nor the optimised prompts)."""
    lr: float = 0.01
    """Adam learning rate (paper: 1e-2)."""
    max_steps: int = 1000
    """At most this many steps per task (paper: 1000)."""
    patience: int = 200
    """Stop when L0 has not reached a new minimum for this many steps (paper: 200)."""
    n_train: int = 24
    """0-shot training prompts per task (paper: 24)."""
    ito_k: tuple[int, ...] = (5, 20)
    """Gradient pursuit baselines with these k."""
    sweep_l1: tuple[float, ...] = ()
    """Also clean with each of these λ (held-out nll and L0 per λ)."""
    detectors: bool = False
    """Clean the detector vectors (output tokens) instead of the task vectors."""
    seed: int = 0
    """Seed of the training prompts."""

    def __post_init__(self) -> None:
        checks = [
            (self.l1 is None or self.l1 >= 0, f"--l1 must be ≥ 0 or auto (got {self.l1})"),
            (all(lam >= 0 for lam in self.sweep_l1), "--sweep-l1 values must be ≥ 0"),
            (len(self.l1_grid) > 0 and all(lam >= 0 for lam in self.l1_grid), "--l1-grid needs at least one value, all ≥ 0"),
            (self.l1_start > 0, f"--l1-start must be > 0 (got {self.l1_start})"),
            (self.l1_tolerance >= 0, f"--l1-tolerance must be ≥ 0 (got {self.l1_tolerance})"),
            (self.l1_slack >= 0, f"--l1-slack must be ≥ 0 (got {self.l1_slack})"),
            (self.n_val >= 1, f"--n-val must be ≥ 1 (got {self.n_val})"),
            (self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (self.max_steps >= 1, f"--max-steps must be ≥ 1 (got {self.max_steps})"),
            (self.patience >= 1, f"--patience must be ≥ 1 (got {self.patience})"),
            (self.n_train >= 1, f"--n-train must be ≥ 1 (got {self.n_train})"),
        ]
        for ok, message in checks:
            if not ok:
                raise IclError(message)
        self.l1_grid = tuple(sorted(set(float(x) for x in self.l1_grid), reverse=True))

    @property
    def auto(self) -> bool:
        return self.l1 is None

    @property
    def start_index(self) -> int:
        """Index in ``l1_grid`` (largest first) of the λ nearest ``l1_start`` in log scale (0 counts as 1e-12)."""
        lg = lambda x: math.log(max(x, 1e-12))  # noqa: E731
        return min(range(len(self.l1_grid)), key=lambda i: (abs(lg(self.l1_grid[i]) - lg(self.l1_start)), i))

    def key_params(self) -> dict[str, Any]:
        """The parameters that decide the result (auto's settings only matter under --l1 auto)."""
        p = asdict(self)
        p["l1"] = "auto" if self.auto else self.l1
        if not self.auto:
            for k in ("l1_grid", "l1_start", "l1_tolerance", "l1_slack", "n_val"):
                p.pop(k)
        return p


def method_name(m: str) -> str:
    """The name people read for a method key (``ito_k`` keys are gradient pursuit with k atoms)."""
    fixed = {"zero_shot": "0-shot, no vector", "tv": "raw task vector", "recon": "SAE reconstruction", "cleaned": "cleaned"}
    if m in fixed:
        return fixed[m]
    if m.startswith("ito_"):
        return f"gradient pursuit, k = {m[4:]}"
    return m


def method_order(keys: Sequence[str]) -> list[str]:
    """0-shot, raw TV, reconstruction, gradient pursuit by k, cleaned."""
    ito = sorted((m for m in keys if m.startswith("ito_")), key=lambda m: int(m[4:]))
    return [m for m in BASE_METHODS if m in keys] + ito + (["cleaned"] if "cleaned" in keys else [])


@dataclass
class CleanResult:
    features: list[int]
    weights: list[float]
    l0: dict[str, int]
    nll: dict[str, float]
    acc: dict[str, float]
    steps: int
    sweep: dict[str, list[float]] = field(default_factory=dict)  # l1, l0, nll
    l1: float | None = None
    """The λ the cleaned vector was made with (chosen per task under --l1 auto)."""
    auto: dict[str, Any] = field(default_factory=dict)
    """--l1 auto: l1, l0, val_nll of each λ tried (largest first), val_nll_tv, limit, passed."""
    flags: list[str] = field(default_factory=list)
    """Flags of the task from its collect sweep (collect_io.FLAGS)."""

    def save(self, path) -> None:
        """Write this result as JSON, atomically (partial results of an interrupted run)."""
        import os

        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(asdict(self), fh)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "CleanResult | None":
        try:
            with open(path) as fh:
                return cls(**json.load(fh))
        except (OSError, ValueError, TypeError):
            return None

    @property
    def l0_fraction(self) -> float:
        return self.l0["cleaned"] / max(self.l0["recon"], 1)

    def loss_delta(self, method: str = "cleaned") -> float:
        """(nll_TV − nll_method) / nll_zero-shot: > 0 when the method beats the raw TV."""
        return (self.nll["tv"] - self.nll[method]) / max(self.nll["zero_shot"], 1e-9)


def write_h5(f, layer: int, results: dict[str, CleanResult], meta: dict | None = None) -> None:
    """Write the layout above into an open h5py.File; ``meta``: l1, l1_tolerance, sae, sae_label."""
    import numpy as np

    f.attrs["layer"] = layer
    for k, v in (meta or {}).items():
        if v is not None:
            f.attrs[k] = v if isinstance(v, (int, float)) else str(v)
    for name, r in results.items():
        g = f.create_group(f"tasks/{name}")
        g.create_dataset("features", data=np.asarray(r.features, dtype=np.int64))
        g.create_dataset("weights", data=np.asarray(r.weights, dtype=np.float32))
        for group, values in (("l0", r.l0), ("nll", r.nll), ("acc", r.acc)):
            for m, v in values.items():
                g.create_dataset(f"{group}/{m}", data=v)
        for k, v in r.sweep.items():
            g.create_dataset(f"sweep/{k}", data=v)
        for k, v in r.auto.items():
            if isinstance(v, list):
                g.create_dataset(f"auto/{k}", data=v)
        if r.auto:
            for k in ("val_nll_tv", "limit", "passed"):
                g["auto"].attrs[k] = r.auto[k]
        g.attrs["steps"] = r.steps
        if r.l1 is not None:
            g.attrs["l1"] = r.l1
        g.attrs["flags"] = json.dumps(r.flags)


def read_h5(path) -> tuple[int, dict[str, CleanResult]]:
    """(layer, task -> CleanResult) of a clean.h5 (format 1 files too)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            layer = int(f.attrs["layer"])
            results = {}
            for name, g in f["tasks"].items():
                get = lambda grp, cast: {m: cast(v[()]) for m, v in g[grp].items()}  # noqa: E731
                sweep = {k: v[()].tolist() for k, v in g["sweep"].items()} if "sweep" in g else {}
                auto = {}
                if "auto" in g:
                    auto = {k: v[()].tolist() for k, v in g["auto"].items()}
                    auto.update({k: _py(v) for k, v in g["auto"].attrs.items()})
                l1 = float(g.attrs["l1"]) if "l1" in g.attrs else None
                flags = json.loads(g.attrs["flags"]) if "flags" in g.attrs else []
                results[name] = CleanResult(g["features"][()].tolist(), g["weights"][()].tolist(), get("l0", int),
                                            get("nll", float), get("acc", float), int(g.attrs["steps"]), sweep,
                                            l1, auto, flags)
    except (OSError, KeyError) as exc:
        raise IclError(f"{path} is not a readable clean artifact ({exc}); run `icl store verify`") from None
    return layer, results


def read_meta(path) -> dict[str, Any]:
    """The root attributes of a clean.h5 (l1, l1_tolerance, sae, sae_label; absent in format 1)."""
    import h5py

    with h5py.File(path, "r") as f:
        return {k: _py(v) for k, v in f.attrs.items() if k not in ("icl_key", "icl_step")}


def _py(v):
    return v.item() if hasattr(v, "item") else v


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def _subset(results: dict[str, CleanResult], names: list[str]) -> dict[str, Any]:
    """Means over ``names`` of each method's L0, held-out nll and accuracy, the L0 fraction and
    the loss delta of the cleaned vector."""
    rs = [results[n] for n in names]
    keys = method_order(list(rs[0].nll)) if rs else []
    methods = {m: {"name": method_name(m),
                   "l0": _mean(r.l0[m] for r in rs) if m in rs[0].l0 else None,
                   "nll": _mean(r.nll[m] for r in rs), "acc": _mean(r.acc[m] for r in rs)} for m in keys}
    return {"n_tasks": len(rs), "methods": methods, "l0_fraction": _mean(r.l0_fraction for r in rs),
            "loss_delta": _mean(r.loss_delta() for r in rs)}


def summary_json(key: str, layer: int, results: dict[str, CleanResult], meta: dict | None = None) -> dict:
    """The clean result as one JSON document.

    ``mean`` keeps the keys of format 1 (over every task). ``summary.all`` / ``summary.unflagged``
    hold each method's mean L0, nll and accuracy with its readable name, over every task and over
    the tasks without a flag. JSON method keys stay short (``ito_5`` is gradient pursuit with k = 5);
    ``methods`` maps them to their names."""
    meta = meta or {}
    tasks = {}
    for name, r in results.items():
        tasks[name] = {"features": r.features, "weights": r.weights, "l0": r.l0, "nll": r.nll, "acc": r.acc,
                       "l0_fraction": r.l0_fraction, "loss_delta": r.loss_delta(), "steps": r.steps,
                       "l1": r.l1, "flags": r.flags}
        if r.sweep:
            tasks[name]["sweep"] = r.sweep
        if r.auto:
            tasks[name]["auto"] = r.auto
    n = max(len(results), 1)
    mean = {
        "l0_recon": sum(r.l0["recon"] for r in results.values()) / n,
        "l0_cleaned": sum(r.l0["cleaned"] for r in results.values()) / n,
        "l0_fraction": sum(r.l0_fraction for r in results.values()) / n,
        "nll_tv": sum(r.nll["tv"] for r in results.values()) / n,
        "nll_cleaned": sum(r.nll["cleaned"] for r in results.values()) / n,
        "nll_zero_shot": sum(r.nll["zero_shot"] for r in results.values()) / n,
    }
    keys = method_order(list(next(iter(results.values())).nll)) if results else []
    unflagged = [t for t, r in results.items() if not r.flags]
    return {"key": key, "layer": layer, "sae": meta.get("sae"), "sae_label": meta.get("sae_label"),
            "detectors": bool(meta.get("detectors")), "l1": meta.get("l1"), "l1_tolerance": meta.get("l1_tolerance"),
            "l1_slack": meta.get("l1_slack"),
            "l1_chosen": {t: r.l1 for t, r in results.items()},
            "methods": {m: method_name(m) for m in keys},
            "flags": dict(FLAGS), "solved_nll_threshold": SOLVED_NLL,
            "flagged": flagged({t: r.flags for t, r in results.items()}),
            "summary": {"all": _subset(results, list(results)), "unflagged": _subset(results, unflagged)},
            "mean": mean, "tasks": tasks}


def l1_text(data: dict) -> str:
    """λ as people read it: the fixed value, or auto with the range chosen."""
    chosen = sorted(v for v in data["l1_chosen"].values() if v is not None)
    if data.get("l1") == "auto":
        tol = data.get("l1_tolerance")
        rng = f"{chosen[0]:g}–{chosen[-1]:g}, median {chosen[len(chosen) // 2]:g}" if chosen else "none"
        slack = data.get("l1_slack")
        plus = f" + {slack:g} nats" if slack else ""
        return f"λ auto (per task, validation nll within {100 * tol:.0f}%{plus} of the raw vector's; chosen {rng})"
    if data.get("l1") is not None:
        return f"λ = {float(data['l1']):g}"
    return f"λ = {chosen[0]:g}" if chosen else "λ unknown"


def flag_note(data: dict) -> str:
    n = len({t for ts in data["flagged"].values() for t in ts})
    if not n:
        return "no flagged task"
    return f"flagged {n} of {len(data['tasks'])} tasks ({flag_parts(data['flagged'])})"
