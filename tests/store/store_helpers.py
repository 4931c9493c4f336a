"""Helpers shared by the store tests (a uniquely named module, importable from any test dir)."""

from __future__ import annotations

import subprocess
import sys

from icl_cli.store import Store, StepSpec


def make(store: Store, step: str = "collect", name: str | None = None, inputs=None, **params):
    """Publish a small artifact holding one JSON file; returns the Artifact."""

    def build(st):
        st.write_json("out.json", {"step": step, "params": params})
        return {"loss": 1.5}

    return store.run(StepSpec(step, params, inputs or {}), build, name=name).artifact


def spawn(code: str, *args: str) -> subprocess.Popen:
    """Start ``python -c code args...`` with pipes (a real, separate writer process)."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
