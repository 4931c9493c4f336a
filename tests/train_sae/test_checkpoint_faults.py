"""Damaged training checkpoints (issue 23, item 6): --resume never trains on a damaged checkpoint,
falls back to the previous intact one (same weights as an uninterrupted run), and never deletes the
last checkpoint it has."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from resume_worker import run  # noqa: E402

from icl_cli.core.errors import IntegrityError  # noqa: E402
from icl_cli.train_sae import checkpoint as ckpt  # noqa: E402


def _flip(path: Path, tensor: str, byte: int, bit: int) -> None:
    """Flip one bit of the first element of ``tensor`` (little-endian float32: byte 3 holds the
    sign and the high exponent bits, byte 0 the low mantissa bits)."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n + json.loads(raw[8 : 8 + n])[tensor]["data_offsets"][0]
    raw[start + byte] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _same(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        for (name, p), q in zip(x.sae.state_dict().items(), y.sae.state_dict().values()):
            assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run trained to the end (48 steps): its work dir holds checkpoints of steps 45 and 40."""
    work = tmp_path_factory.mktemp("ref")
    results = run(work, resume=False, slow=False)
    assert ckpt.step_of(work) == 45
    return work, results


@pytest.mark.parametrize("damage", ["mantissa bit", "truncated", "garbled header"])
def test_resume_skips_a_damaged_latest_checkpoint(finished, tmp_path, damage, caplog):
    ref_dir, ref = finished
    work = tmp_path / "work"
    shutil.copytree(ref_dir, work)
    latest = work / ckpt.LATEST
    if damage == "mantissa bit":
        _flip(latest, "sae0.W_enc", byte=0, bit=0)
    elif damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:-1000])
    else:
        raw = latest.read_bytes()
        latest.write_bytes(raw[:8] + b"[" + raw[9:])
    assert ckpt.step_of(work) == 40  # the previous one
    with caplog.at_level("WARNING", logger="icl"):
        res = run(work, resume=True, slow=False)
    assert "latest.safetensors" in caplog.text and "resuming from previous.safetensors (step 40)" in caplog.text
    _same(ref, res)  # resumed from step 40: exactly the uninterrupted run


def test_no_intact_checkpoint_stops_resume_and_deletes_nothing(finished, tmp_path):
    ref_dir, _ = finished
    work = tmp_path / "work"
    shutil.copytree(ref_dir, work)
    (work / ckpt.PREVIOUS).unlink()
    _flip(work / ckpt.LATEST, "sae0.W_enc", byte=3, bit=6)  # an exponent bit: a huge weight
    before = (work / ckpt.LATEST).read_bytes()
    with pytest.raises(IntegrityError, match="rerun without --resume") as err:
        run(work, resume=True, slow=False)
    assert err.value.exit_code == 3 and "\n" not in str(err.value) and "does not match its sha256" in str(err.value)
    assert (work / ckpt.LATEST).read_bytes() == before  # still there, for whoever wants to look


def test_a_nan_step_never_deletes_the_only_checkpoint(tmp_path):
    work = tmp_path / "w"
    ckpt.save(work, {"w": torch.ones(3)}, {"step": 5})
    ckpt.drop_latest(work)  # no previous checkpoint: the latest stays
    assert ckpt.step_of(work) == 5
    ckpt.save(work, {"w": torch.ones(3) * 2}, {"step": 6})
    _flip(work / ckpt.PREVIOUS, "w", byte=0, bit=0)
    ckpt.drop_latest(work)  # a damaged previous one is no replacement either
    assert ckpt.step_of(work) == 6
