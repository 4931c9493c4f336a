"""Fixtures of the store tests: a fresh store, a publisher of small artifacts, a subprocess runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from icl_cli.store import StepSpec, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def _make(store: Store, step: str = "collect", name: str | None = None, inputs=None, **params):
    """Publish a small artifact holding one JSON file; returns the Artifact."""

    def build(st):
        st.write_json("out.json", {"step": step, "params": params})
        return {"loss": 1.5}

    return store.run(StepSpec(step, params, inputs or {}), build, name=name).artifact


def _spawn(code: str, *args: str) -> subprocess.Popen:
    """Start ``python -c code args...`` with pipes (a real, separate writer process)."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture
def make():
    """``make(store, step="collect", name=None, inputs=None, **params)`` -> a published Artifact."""
    return _make


@pytest.fixture
def spawn():
    """``spawn(code, *args)`` -> a running ``python -c code`` subprocess with pipes."""
    return _spawn
