"""Issue 23, item 1, end to end: a step given a damaged input (one flipped bit in an imported SAE,
in collect's file, or in a reused clean artifact) exits 3 with one line and publishes nothing; once
the bit is flipped back the same command succeeds."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.dictionaries.io import save_saelens
from icl_cli.store import Store


def _flip_top_byte(path: Path, tensor: str | None = None) -> None:
    """Flip the top bit of ``tensor``'s first float (safetensors), or of the file's middle byte."""
    os.chmod(path, 0o644)
    raw = bytearray(path.read_bytes())
    if tensor is None:
        at = len(raw) // 2
    else:
        (n,) = struct.unpack("<Q", raw[:8])
        at = 8 + n + json.loads(raw[8 : 8 + n])[tensor]["data_offsets"][0] + 3
    raw[at] ^= 0x80
    path.write_bytes(bytes(raw))


@pytest.fixture
def tv_and_sae(tiny_toy_dir, tmp_path):
    store = str(tmp_path / "s")
    runner = CliRunner()
    res = runner.invoke(app, ["--store", store, "-q", "collect", "--model", str(tiny_toy_dir), "--tasks", "antonyms",
                              "--layers", "1", "--n-shot", "3", "--n-prompts", "2", "--n-eval", "4"])
    assert res.exit_code == 0, res.output
    torch.manual_seed(0)
    sae = build(DictConfig(d_in=32, d_sae=96, arch="gated", site="resid_pre", layer=1))
    with torch.no_grad():
        sae.b_mag.fill_(0.05)
    save_saelens(sae, tmp_path / "sae")
    imp = runner.invoke(app, ["--store", store, "-q", "store", "import", str(tmp_path / "sae"), "--kind", "sae"])
    assert imp.exit_code == 0, imp.output
    return store, res.stdout.strip(), imp.stdout.strip()


def _clean(store: str, tv: str, sae: str, steps: int):
    return CliRunner().invoke(app, ["--store", store, "--json", "clean", "--tv", tv, "--sae", sae,
                                    "--max-steps", str(steps), "--patience", "5"])


def test_a_damaged_sae_or_tv_stops_clean_and_nothing_is_published(tv_and_sae):
    store, tv, sae = tv_and_sae
    s = Store(store)
    weights = s.get(sae).file("sae_weights.safetensors")
    tv_file = next(s.get(tv).path / f for f in s.get(tv).files if f.endswith(".h5"))
    before = sorted(s.keys())
    for damaged, tensor in ((weights, "b_dec"), (tv_file, None)):
        _flip_top_byte(damaged, tensor)
        res = _clean(store, tv, sae, steps=20)
        assert res.exit_code == 3, res.output
        assert "is damaged" in res.output and "sha256 mismatch" in res.output and "Traceback" not in res.output
        assert res.stdout == "" and sorted(Store(store).keys()) == before  # nothing computed from it
        _flip_top_byte(damaged, tensor)  # repaired
    res = _clean(store, tv, sae, steps=20)
    assert res.exit_code == 0, res.output
    assert Store(store).verify(json.loads(res.stdout)["key"])


def test_a_damaged_clean_artifact_is_not_reused(tv_and_sae):
    store, tv, sae = tv_and_sae
    first = _clean(store, tv, sae, steps=10)
    assert first.exit_code == 0, first.output
    art = Store(store).get(json.loads(first.stdout)["key"])
    _flip_top_byte(next(art.path / f for f in art.files if f.endswith(".h5")))
    again = _clean(store, tv, sae, steps=10)  # the reuse path
    assert again.exit_code == 3 and "pass --force to recompute it" in again.output and again.stdout == ""
    forced = CliRunner().invoke(app, ["--store", store, "--json", "clean", "--tv", tv, "--sae", sae,
                                      "--max-steps", "10", "--patience", "5", "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout) == json.loads(first.stdout)  # recomputed: the same result again
