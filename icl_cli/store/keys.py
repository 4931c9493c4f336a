"""Artifact keys: sha256 of a canonical JSON of what a step computes from.

    key = sha256(canonical_json({"step", "version", "params", "inputs"}))

* ``params`` are the fully resolved parameters (defaults included: pass the params dataclass,
  or a dict that already holds every default), minus the speed-only ones in ``SPEED_PARAMS``,
  which are recorded in the manifest but never hashed.
* ``inputs`` maps an input name to the full key of the artifact it was read from.
* ``version`` is the step's own format version: bump it when the step's output changes for the
  same parameters, so old artifacts stop being reused.

Values are normalised before hashing so that equal settings give equal keys: dict order never
matters, tuples and lists are the same, paths are POSIX strings, integral floats equal their
ints (``1.0`` and ``1``), ``-0.0`` is ``0``, and NaN/inf are spelled as strings.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Mapping

# The one list of parameters that change how fast a step runs but never what it computes.
SPEED_PARAMS: frozenset[str] = frozenset(
    {
        "batch_size",
        "inference_batch_size",
        "eval_batch_size",
        "workers",
        "num_workers",
        "device",
        "device_map",
        "progress",
        "compile",
    }
)

KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def normalise(value: Any, exact_floats: bool = False) -> Any:
    """A JSON-ready copy of ``value`` in which equal settings are spelled the same way.

    ``exact_floats`` keeps integral floats as floats (for data and metrics, not for keys)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return normalise(value.value, exact_floats)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value.is_integer() and not exact_floats:
            return int(value)  # 1.0 == 1; also folds -0.0 into 0
        return float(value)
    if isinstance(value, PurePath):
        return value.as_posix()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: normalise(getattr(value, f.name), exact_floats) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): normalise(v, exact_floats) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v, exact_floats) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [normalise(v, exact_floats) for v in value]
        return sorted(items, key=canonical_json)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and hasattr(value, "dtype"):
        return normalise(value.item(), exact_floats)  # numpy / torch scalars
    if hasattr(value, "tolist"):
        return normalise(value.tolist(), exact_floats)  # small arrays and tensors
    if type(value).__module__ == "torch" and type(value).__name__ in ("dtype", "device"):
        return str(value)
    raise TypeError(f"cannot hash a parameter of type {type(value).__name__}: {value!r}")


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, no NaN: one spelling per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def params_dict(params: Any) -> dict[str, Any]:
    """Normalised parameters from a dict or a params dataclass (every field, defaults included)."""
    if params is None:
        return {}
    out = normalise(params)
    if not isinstance(out, dict):
        raise TypeError(f"step params must be a dict or a dataclass, not {type(params).__name__}")
    return out


def split_params(params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hashed params, speed-only params) of a step."""
    full = params_dict(params)
    hashed = {k: v for k, v in full.items() if k not in SPEED_PARAMS}
    speed = {k: v for k, v in full.items() if k in SPEED_PARAMS}
    return hashed, speed


def input_key(value: Any) -> str:
    """The full key of an input given as an Artifact or a key string."""
    key = getattr(value, "key", value)
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"an input must be an Artifact or a full 64-character key, not {value!r}")
    return key


def compute_key(step: str, version: int, params: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """sha256 of the canonical JSON of a step's identity (params already split and normalised)."""
    payload = {"step": step, "version": int(version), "params": dict(params), "inputs": dict(inputs)}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


@dataclass
class StepSpec:
    """What a step computes from: its name, parameters, input artifacts and format version."""

    step: str
    """Step name, e.g. ``collect``."""
    params: Any = field(default_factory=dict)
    """A dict of fully resolved parameters, or the step's params dataclass."""
    inputs: Mapping[str, Any] = field(default_factory=dict)
    """Input name -> Artifact or full key (``None`` values are dropped)."""
    version: int = 1
    """The step's format version: bump it when its output changes for the same parameters."""

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", self.step or ""):
            raise ValueError(f"step name {self.step!r} must be letters, digits, '_', '.' or '-'")

    @property
    def hashed_params(self) -> dict[str, Any]:
        return split_params(self.params)[0]

    @property
    def speed_params(self) -> dict[str, Any]:
        return split_params(self.params)[1]

    @property
    def input_keys(self) -> dict[str, str]:
        return {str(name): input_key(v) for name, v in self.inputs.items() if v is not None}

    @property
    def key(self) -> str:
        return compute_key(self.step, self.version, self.hashed_params, self.input_keys)
