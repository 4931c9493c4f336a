"""safetensors files with reproducible bytes and a data checksum (issue 23, items 5, 6 and 9), and
SAE imports that refuse non-finite weights."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.store import tensorfile


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    tensors = {"W_enc": torch.randn(4, 8), "b_dec": torch.randn(4).half(), "n": torch.arange(3)}
    meta = {"icl_key": "k" * 64, "icl_step": "train-sae", "layer": 3, "note": 'quote " back\\slash\nnewline é'}
    shas = set()
    for i in range(8):  # the library's own writer orders metadata differently from file to file
        order = dict(sorted(meta.items(), key=lambda kv: hash((i, kv[0]))))
        shas.add(_sha(tensorfile.save(tmp_path / f"{i}.safetensors", tensors, order)))
    assert len(shas) == 1
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == {k: str(v) for k, v in meta.items()}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    raw = (tmp_path / "0.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(meta) and n % 8 == 0
    np_file = tensorfile.save(tmp_path / "np.safetensors", {"x": np.ones(3, dtype=np.float32)}, {"b": 1, "a": 2})
    assert tensorfile.damage(np_file) is None


def test_the_checksum_finds_flipped_truncated_and_garbled_files(tmp_path):
    path = tensorfile.save(tmp_path / "c.safetensors", {"w": torch.randn(64, 64)}, {"step": 7}, checksum=True)
    assert tensorfile.damage(path) is None
    with safe_open(str(path), "pt") as f:
        assert len(f.metadata()[tensorfile.CHECKSUM]) == 64
    good = path.read_bytes()
    for i, bad in enumerate([
        good[:-9000] + bytes([good[-9000] ^ 0x04]) + good[-8999:],  # one mantissa bit
        good[:-100],  # truncated
        good[:8] + b"{" * 20 + good[28:],  # header garbled
        b"",
    ]):
        p = tmp_path / f"bad{i}.safetensors"
        p.write_bytes(bad)
        assert tensorfile.damage(p) is not None, i
    assert tensorfile.damage(tmp_path / "missing.safetensors") == "it is missing"


@pytest.mark.parametrize("tensor,value", [("W_enc", float("nan")), ("b_dec", float("inf"))])
def test_import_refuses_an_sae_with_non_finite_weights(tmp_path, tensor, value):
    from icl_cli.dictionaries import DictConfig, build, save_saelens

    d = build(DictConfig(d_in=8, d_sae=16, arch="gated"))
    with torch.no_grad():
        getattr(d, tensor).view(-1)[3] = value
    folder = save_saelens(d, tmp_path / "sae")
    store = tmp_path / "store"
    for src in (folder, folder / "sae_weights.safetensors"):
        res = CliRunner().invoke(app, ["--store", str(store), "store", "import", str(src), "--kind", "sae"])
        assert res.exit_code == 1, res.output
        line = " ".join(res.output.split())
        assert f"tensor {tensor} holds 1 non-finite value(s)" in line and len(res.output.strip().splitlines()) <= 2
    assert not store.exists() or not [p for p in store.iterdir() if not p.name.startswith(".")]
