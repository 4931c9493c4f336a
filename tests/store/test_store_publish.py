"""Publishing: manifest, read-only files, provenance in files, reuse, force, atomicity under kill -9
and concurrent writers (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import h5py
import pytest
import torch
from safetensors import safe_open

from icl_cli.core.errors import IclError
from icl_cli.store import StepSpec
from icl_cli.store.staging import publish


def _build_all(st):
    st.save_safetensors("tv.safetensors", {"tv": torch.arange(6.0).reshape(2, 3)}, metadata={"layer": 3})
    with st.h5("acts.h5") as f:
        f["x"] = [1.0, 2.0]
    st.write_json("sub/info.json", {"ok": True, "scale": 1.0, "path": Path("a/b")})
    (st.work_dir / "ckpt.pt").write_bytes(b"checkpoint")
    return {"nll": 2.5, "acc": 1.0}


def test_publish_writes_manifest_provenance_and_readonly_files(store):
    spec = StepSpec("collect", {"layer": 3, "batch_size": 4, "device": "cpu"}, version=2)
    res = store.run(spec, _build_all, name="tv3")
    art = res.artifact
    assert not res.reused and art.key == spec.key
    assert art.path == store.root / art.key[:2] / art.key
    m = json.loads((art.path / "manifest.json").read_text())
    assert m["key"] == art.key and m["step"] == "collect" and m["version"] == 2
    assert m["params"] == {"layer": 3} and m["speed_params"] == {"batch_size": 4, "device": "cpu"}
    assert m["metrics"] == {"nll": 2.5, "acc": 1.0} and isinstance(m["metrics"]["acc"], float)
    assert json.loads(art.file("sub/info.json").read_text()) == {"ok": True, "scale": 1.0, "path": "a/b"}
    assert m["names"] == ["tv3"] and art.names == ["tv3"]
    assert m["code"]["icl_cli"] and m["env"]["python"] and m["env"]["device"] == "cpu"
    assert m["created"] and m["duration_s"] >= 0
    assert set(m["files"]) == {"tv.safetensors", "acts.h5", "sub/info.json"}
    assert m["files"]["sub/info.json"]["size"] == (art.path / "sub/info.json").stat().st_size
    # read-only files and folders
    for p in [art.path, art.path / "sub", art.file("tv.safetensors"), art.path / "manifest.json"]:
        assert stat.S_IMODE(p.stat().st_mode) & 0o222 == 0, p
    # a file copied out still says where it came from
    with safe_open(art.file("tv.safetensors"), "pt") as f:
        assert f.metadata()["icl_key"] == art.key and f.metadata()["icl_step"] == "collect"
        assert f.metadata()["layer"] == "3"
    with h5py.File(art.file("acts.h5"), "r") as f:
        assert f.attrs["icl_key"] == art.key and f.attrs["icl_step"] == "collect"
    # scratch is gone after a successful publish, and nothing is left staged
    assert not (store.root / ".work" / art.key).exists()
    assert list((store.root / ".staging").iterdir()) == []
    with pytest.raises(IclError, match="no file"):
        art.file("nope.h5")


def test_rerun_reuses_and_force_replaces(store):
    calls, logs = [], []

    def build(st):
        calls.append(1)
        st.write_json("a.json", {"n": len(calls)})

    spec = StepSpec("collect", {"layer": 1})
    first = store.run(spec, build, log=logs.append).artifact
    again = store.run(StepSpec("collect", {"layer": 1, "batch_size": 99}), build, log=logs.append)
    assert again.reused and again.artifact.key == first.key and len(calls) == 1
    assert logs[-1] == f"reusing {first.key[:12]} (step collect); pass --force to recompute"
    forced = store.run(spec, build, force=True, log=logs.append)
    assert not forced.reused and len(calls) == 2
    assert json.loads(forced.artifact.file("a.json").read_text()) == {"n": 2}
    assert store.keys() == [first.key]
    forced.artifact.verify()


def test_failed_build_leaves_nothing_but_its_checkpoints(store):
    def build(st):
        st.write_json("half.json", {})
        (st.work_dir / "step100.pt").write_bytes(b"x")
        raise RuntimeError("out of memory")

    spec = StepSpec("train-sae", {"layer": 1})
    with pytest.raises(RuntimeError):
        store.run(spec, build)
    assert store.lookup(spec) is None and store.keys() == []
    assert list((store.root / ".staging").iterdir()) == []
    assert (store.root / ".work" / spec.key / "step100.pt").exists()  # a rerun can resume

    def resume(st):
        assert (st.work_dir / "step100.pt").read_bytes() == b"x"
        st.write_json("done.json", {})

    store.run(spec, resume)
    assert not (store.root / ".work" / spec.key).exists()


def test_a_step_may_not_write_the_manifest(store):
    with pytest.raises((IclError, ValueError)):
        store.run(StepSpec("s", {}), lambda st: st.write_json("manifest.json", {}))
    assert store.keys() == []


def test_publish_onto_an_existing_artifact_keeps_theirs(store, tmp_path, make):
    art = make(store, layer=1)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "x").write_text("ours")
    assert publish(ours, art.path) is False
    art.verify()


_KILL_WRITER = """
import sys, time
from icl_cli.store import Store, StepSpec
def build(st):
    st.write_json("part1.json", {"half": True})
    print("written", flush=True)
    time.sleep(60)
Store(sys.argv[1]).run(StepSpec("collect", {"layer": 5}), build)
"""


def test_kill_9_mid_write_leaves_no_artifact_and_gc_cleans(store, spawn):
    proc = spawn(_KILL_WRITER, str(store.root))
    try:
        assert proc.stdout.readline().strip() == "written", proc.stderr.read()
        staged = list((store.root / ".staging").iterdir())
        assert len(staged) == 1 and (staged[0] / "part1.json").exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    spec = StepSpec("collect", {"layer": 5})
    assert store.lookup(spec) is None and store.keys() == []
    report = store.gc(older_than_seconds=14 * 86400)  # the writer is dead: no need to wait
    assert report.staging == [str(staged[0])] and not staged[0].exists()
    assert store.run(spec, lambda st: {"n": st.write_json("part1.json", {}).stat().st_size}).artifact.verify()


_LOOP_WRITER = """
import sys
from icl_cli.store import Store, StepSpec
store = Store(sys.argv[1])
def build(st):
    for j in range(20):
        st.write_json(f"f{j}.json", {"j": j, "pad": "x" * 2000})
for i in range(10_000):
    store.run(StepSpec("loop", {"i": i}), build)
    print(i, flush=True)
"""


def test_kill_9_at_a_random_moment_never_leaves_a_partial_artifact(store, spawn):
    proc = spawn(_LOOP_WRITER, str(store.root))
    try:
        for _ in range(3):
            proc.stdout.readline()
        time.sleep(0.05 + (os.getpid() % 7) / 100)  # somewhere inside a later publish
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    published = [p for p in store.root.glob("??/*") if p.is_dir()]
    assert len(published) >= 3
    for path in published:  # every folder in the layout is complete and intact
        store.get(path.name).verify()
    store.gc(older_than_seconds=14 * 86400)
    assert not any((store.root / ".staging").iterdir())
