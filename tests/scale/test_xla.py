"""--device xla without a usable torch_xla: one clear line (IclError), never a traceback."""

from __future__ import annotations

import sys
import types

import pytest
from typer.testing import CliRunner

from icl_cli.core.models import resolve_device, resolve_dtype
from icl_cli.core.errors import IclError

XLA_MODULES = ("torch_xla", "torch_xla.core", "torch_xla.core.xla_model")


@pytest.fixture
def no_torch_xla(monkeypatch):
    """torch_xla absent whether or not it is installed (None in sys.modules makes `import` fail)."""
    for name in XLA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_torch_xla_is_one_line(no_torch_xla):
    with pytest.raises(IclError) as err:
        resolve_device("xla")
    msg = str(err.value)
    assert "torch_xla" in msg and "not installed" in msg and "pip install torch_xla" in msg
    assert "\n" not in msg


def test_torch_xla_that_does_not_load_or_finds_no_device(monkeypatch):
    def broken(name, *a, **k):
        if name.startswith("torch_xla"):
            raise ImportError("libtpu.so: undefined symbol _ZN3c10")
        return real_import(name, *a, **k)

    import builtins

    real_import = builtins.__import__
    for name in XLA_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(IclError, match=r"torch_xla, which does not load \(libtpu.so: undefined symbol"):
        resolve_device("xla")
    monkeypatch.setattr(builtins, "__import__", real_import)

    fake = types.ModuleType("torch_xla")

    def no_device():
        raise RuntimeError("No XLA devices found.\nmore detail")

    fake.device = no_device
    monkeypatch.setitem(sys.modules, "torch_xla", fake)
    with pytest.raises(IclError) as err:
        resolve_device("xla")
    assert "found no XLA device (No XLA devices found.)" in str(err.value) and "PJRT_DEVICE=TPU" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_working_torch_xla_gives_its_device_and_bfloat16(monkeypatch):
    import torch

    fake = types.ModuleType("torch_xla")
    fake.device = lambda: types.SimpleNamespace(type="xla", index=0)  # torch.device("xla") needs torch_xla
    monkeypatch.setitem(sys.modules, "torch_xla", fake)
    dev = resolve_device("xla")
    assert dev.type == "xla"
    assert resolve_dtype("auto", dev) is torch.bfloat16


def test_cli_device_xla_without_torch_xla_exits_with_one_line(no_torch_xla, tmp_path):
    from icl_cli.cli.app import app

    res = CliRunner().invoke(app, ["collect", "--tasks", "antonyms", "--device", "xla", "--store", str(tmp_path)])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "torch_xla" in lines[0], res.stderr
    assert "Traceback" not in res.output
