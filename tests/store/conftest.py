"""Fixtures of the store tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from icl_cli.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")
