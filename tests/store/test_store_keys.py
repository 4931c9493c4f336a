"""Keys: stable, independent of dict order, defaults resolved, speed-only params not hashed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from icl_cli.store import SPEED_PARAMS, StepSpec, canonical_json, compute_key, normalise

KEY_A = "a" * 64
KEY_B = "b" * 64


@dataclass
class CleanParams:
    layer: int = 12
    lam: float = 0.05
    lr: float = 1e-2
    max_steps: int = 1000
    tasks: tuple[str, ...] = ("antonyms", "en_es")
    batch_size: int = 8
    device: str = "auto"


def test_key_is_stable_across_releases():
    # A change here silently orphans every artifact people already have: bump on purpose only.
    spec = StepSpec("collect", {"layer": 12, "n_shot": 19, "lam": 0.05}, {"model": KEY_A}, version=1)
    assert spec.key == compute_key("collect", 1, {"n_shot": 19, "lam": 0.05, "layer": 12}, {"model": KEY_A})
    canonical = '{"inputs":{"model":"%s"},"params":{"lam":0.05,"layer":12,"n_shot":19},"step":"collect","version":1}' % KEY_A
    assert spec.key == hashlib.sha256(canonical.encode()).hexdigest()
    assert spec.key == "3271d0ab1a0702d74485a3b55ff3a2ad3bde8b1d4d14deac1b641b934aa3e6ba"


def test_key_independent_of_dict_order_at_every_level():
    a = StepSpec("s", {"x": 1, "y": {"p": 1, "q": [1, {"u": 1, "v": 2}]}}, {"m": KEY_A, "n": KEY_B})
    b = StepSpec("s", {"y": {"q": [1, {"v": 2, "u": 1}], "p": 1}, "x": 1}, {"n": KEY_B, "m": KEY_A})
    assert a.key == b.key
    assert canonical_json(normalise(a.params)) == canonical_json(normalise(b.params))


def test_defaults_resolved_dataclass_equals_explicit_dict():
    explicit = {"layer": 12, "lam": 0.05, "lr": 0.01, "max_steps": 1000, "tasks": ["antonyms", "en_es"]}
    assert StepSpec("clean", CleanParams()).key == StepSpec("clean", explicit).key
    # leaving a default out is a different identity: callers must resolve defaults first
    partial = {k: v for k, v in explicit.items() if k != "max_steps"}
    assert StepSpec("clean", partial).key != StepSpec("clean", CleanParams()).key
    assert StepSpec("clean", CleanParams(lam=0.1)).key != StepSpec("clean", CleanParams()).key


def test_speed_params_recorded_but_not_hashed():
    assert {"batch_size", "inference_batch_size", "workers", "device", "device_map", "progress"} <= SPEED_PARAMS
    slow = StepSpec("clean", CleanParams(batch_size=1, device="cpu"))
    fast = StepSpec("clean", CleanParams(batch_size=64, device="cuda:1"))
    assert slow.key == fast.key
    assert fast.speed_params == {"batch_size": 64, "device": "cuda:1"}
    assert "batch_size" not in fast.hashed_params


@pytest.mark.parametrize(
    "a, b",
    [
        ((1, 2), [1, 2]),
        (Path("a/b/c.json"), "a/b/c.json"),
        (1.0, 1),
        (-0.0, 0),
        (np.float64(0.25), 0.25),
        (np.int64(3), 3),
        ({3, 1, 2}, [1, 2, 3]),
    ],
)
def test_values_normalised(a, b):
    assert StepSpec("s", {"v": a}).key == StepSpec("s", {"v": b}).key


def test_distinct_values_distinct_keys():
    base = StepSpec("s", {"v": 0.1}, {"m": KEY_A})
    assert StepSpec("s", {"v": 0.1 + 1e-12}, {"m": KEY_A}).key != base.key
    assert StepSpec("s", {"v": True}).key != StepSpec("s", {"v": 1}).key
    assert StepSpec("s", {"v": 0.1}, {"m": KEY_B}).key != base.key  # inputs are hashed
    assert StepSpec("s", {"v": 0.1}, {"m": KEY_A}, version=2).key != base.key  # so is the version
    assert StepSpec("t", {"v": 0.1}, {"m": KEY_A}).key != base.key  # and the step
    assert normalise(float("nan")) == "nan" and normalise(float("-inf")) == "-inf"


def test_inputs_must_be_full_keys_and_unhashable_params_fail():
    with pytest.raises(ValueError):
        StepSpec("s", {}, {"m": "abc123"}).key
    with pytest.raises(TypeError):
        StepSpec("s", {"f": object()}).key
