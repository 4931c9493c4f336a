"""One writer per key: concurrent processes computing the same key both succeed and one artifact
remains; a killed holder never blocks the next run (real subprocesses)."""

from __future__ import annotations

import os
import signal
import threading
import time

from icl_cli.store import StepSpec
from icl_cli.store.lock import is_locked, key_lock, lock_path

_WRITER = """
import os, sys, time
from pathlib import Path
from icl_cli.store import Store, StepSpec
store, marks = Store(sys.argv[1]), Path(sys.argv[2])
def build(st):
    (marks / f"built.{os.getpid()}").touch()
    (st.work_dir / "ckpt").write_text(str(os.getpid()))   # the shared resumable folder
    time.sleep(float(sys.argv[3]))
    assert (st.work_dir / "ckpt").read_text() == str(os.getpid()), "work folder shared"
    st.write_json("tv.json", {"value": 42})
res = store.run(StepSpec("collect", {"layer": 7}), build, log=lambda m: print("log:", m, file=sys.stderr, flush=True))
print(res.artifact.key, res.reused)
"""


def _wait_for(pred, timeout=30.0):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_second_writer_waits_then_reuses(store, tmp_path, spawn):
    marks = tmp_path / "marks"
    marks.mkdir()
    first = spawn(_WRITER, str(store.root), str(marks), "1.5")
    _wait_for(lambda: any(marks.glob("built.*")))  # the first one holds the lock and is building
    second = spawn(_WRITER, str(store.root), str(marks), "0")
    outs = [p.communicate(timeout=60) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    key = StepSpec("collect", {"layer": 7}).key
    assert [o.split() for o, _ in outs] == [[key, "False"], [key, "True"]]
    assert [m.name for m in marks.glob("built.*")] == [f"built.{first.pid}"]  # computed once
    assert f"waiting for process {first.pid}" in outs[1][1] and "reusing" in outs[1][1]
    assert store.keys() == [key]
    store.get(key).verify()
    for sub in (".staging", ".work", ".locks"):  # nothing left behind
        assert not any((store.root / sub).iterdir()) if (store.root / sub).exists() else True


def test_many_writers_at_once_build_once(store, tmp_path, spawn):
    marks = tmp_path / "marks"
    marks.mkdir()
    key = StepSpec("collect", {"layer": 7}).key
    with key_lock(store.root, key):  # hold the gate until every writer is queued on it
        procs = [spawn(_WRITER, str(store.root), str(marks), "0.2") for _ in range(4)]
        waiting = [p.stderr.readline() for p in procs]
        assert all("waiting for process" in line for line in waiting), waiting
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert sorted(o.split()[1] for o, _ in outs) == ["False", "True", "True", "True"]
    assert len(list(marks.glob("built.*"))) == 1
    assert store.keys() == [key]


_HOLDER = """
import sys, time
from icl_cli.store import Store, StepSpec
def build(st):
    (st.work_dir / "ckpt").write_text("step 100")
    print("building", flush=True)
    time.sleep(120)
Store(sys.argv[1]).run(StepSpec("collect", {"layer": 5}), build)
"""


def test_a_killed_holder_does_not_block_and_its_checkpoint_is_resumed(store, spawn):
    proc = spawn(_HOLDER, str(store.root))
    spec = StepSpec("collect", {"layer": 5})
    try:
        assert proc.stdout.readline().strip() == "building", proc.stderr.read()
        assert is_locked(store.root, spec.key)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert lock_path(store.root, spec.key).exists()  # the file stays, the lock does not
    assert not is_locked(store.root, spec.key)
    seen = []

    def build(st):
        seen.append((st.work_dir / "ckpt").read_text())
        st.write_json("tv.json", {})

    t0 = time.perf_counter()
    res = store.run(spec, build, log=seen.append)
    assert time.perf_counter() - t0 < 5 and not res.reused
    assert "step 100" in seen and not any("waiting" in str(m) for m in seen)
    assert not lock_path(store.root, spec.key).exists()


def test_stale_lock_file_with_a_dead_pid_is_ignored(store):
    spec = StepSpec("collect", {"layer": 9})
    path = lock_path(store.root, spec.key)
    path.parent.mkdir(parents=True)
    path.write_text("999999999\n")
    res = store.run(spec, lambda st: {"n": st.write_json("x.json", {}).stat().st_size}, log=lambda m: None)
    assert not res.reused and store.keys() == [spec.key]


def test_threads_of_one_process_also_wait(store):
    spec = StepSpec("collect", {"layer": 3})
    built, order = [], []

    def build(st):
        built.append(threading.get_ident())
        time.sleep(0.3)
        st.write_json("x.json", {})

    def worker():
        order.append(store.run(spec, build, log=lambda m: None).reused)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(built) == 1 and sorted(order) == [False, True, True]


def test_lock_is_reentrant_within_a_thread(store):
    with key_lock(store.root, "a" * 64):
        with key_lock(store.root, "a" * 64):
            assert is_locked(store.root, "a" * 64)
        assert is_locked(store.root, "a" * 64)
    assert not is_locked(store.root, "a" * 64)


def test_gc_keeps_the_work_folder_of_a_locked_key(store):
    key = "b" * 64
    work = store.root / ".work" / key
    work.mkdir(parents=True)
    (work / "ckpt").write_text("x")
    old = time.time() - 30 * 86400
    os.utime(work / "ckpt", (old, old))
    os.utime(work, (old, old))
    with key_lock(store.root, key):
        assert store.gc(older_than_seconds=86400).work == []
    assert store.gc(older_than_seconds=86400).work == [str(work)]
