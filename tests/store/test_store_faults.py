"""Faults the store must survive (issue 23's campaign): damaged inputs never become results, damaged
artifacts can be removed, gc never deletes what a running step reads, --force replaces atomically,
lock files of killed holders are swept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.core.errors import IclError, IntegrityError
from icl_cli.store import StepSpec, Store
from icl_cli.store.artifact import Artifact


def _damage(path: Path, keep_mtime: bool = False) -> None:
    """Flip one bit in the middle of a read-only artifact file (optionally restoring its mtime)."""
    st = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _counting_full_checks(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = Artifact.problems

    def counted(self):
        calls.append(self.key)
        return real(self)

    monkeypatch.setattr(Artifact, "problems", counted)
    return calls


# ---- 1. damaged inputs ------------------------------------------------------------------------
def test_a_damaged_input_stops_the_step_before_it_computes(store, make):
    tv = make(store, step="collect", layer=1)
    ran = []

    def build(st):
        ran.append(1)
        st.write_json("out.json", {"from": tv.key})

    spec = StepSpec("clean", {"lam": 0.1}, {"tv": tv.key})
    _damage(tv.file("out.json"))
    for attempt in (lambda: store.run(spec, build), lambda: store.resolve(tv.key[:10], step="collect")):
        with pytest.raises(IntegrityError) as err:
            attempt()
        msg = str(err.value)
        assert err.value.exit_code == 3 and "\n" not in msg
        assert "out.json (sha256 mismatch)" in msg and f"icl store rm {tv.key[:12]}" in msg
    assert ran == [] and store.get(spec.key) is None and not any((store.root / ".staging").iterdir())
    assert store.resolve(tv.key, check=False).key == tv.key  # `store show`/`rm` still find it

    _damage(tv.file("out.json"))  # the same bit again: intact
    assert not store.run(spec, build).reused and ran == [1]


def test_the_check_hashes_once_then_trusts_unchanged_file_metadata(store, make, monkeypatch):
    tv = make(store, step="collect", layer=1)
    full = _counting_full_checks(monkeypatch)
    store.resolve(tv.key)
    Store(store.root).resolve(tv.key)
    assert full == []  # publishing hashed it; nothing changed since
    # another process (only the record in .verified) trusts it too
    code = "import sys; from icl_cli.store import Store; Store(sys.argv[1]).resolve(sys.argv[2]); print('ok')"
    out = subprocess.run([sys.executable, "-c", code, str(store.root), tv.key], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr

    os.utime(tv.file("out.json"))  # touched, not changed: one full hash, then trusted again
    store.resolve(tv.key)
    store.resolve(tv.key)
    assert full == [tv.key]
    # damage that restores the mtime still changes the ctime: caught
    _damage(tv.file("out.json"), keep_mtime=True)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.resolve(tv.key)


def test_an_input_damaged_while_the_step_runs_is_not_published(store, make):
    tv = make(store, step="collect", layer=1)

    def build(st):
        _damage(tv.file("out.json"))  # e.g. another program writing into the store meanwhile
        st.write_json("out.json", {"computed": True})

    spec = StepSpec("clean", {"lam": 0.1}, {"tv": tv})
    with pytest.raises(IntegrityError, match="nothing was published"):
        store.run(spec, build)
    assert store.get(spec.key) is None and not any((store.root / ".staging").iterdir())


def test_a_damaged_result_is_not_reused_and_force_replaces_it(store, make):
    art = make(store, step="clean", lam=0.5)
    _damage(art.file("out.json"))
    spec = StepSpec("clean", {"lam": 0.5})

    def build(st):
        st.write_json("out.json", {"step": "clean", "params": {"lam": 0.5}})

    with pytest.raises(IntegrityError, match="pass --force to recompute it"):
        store.run(spec, build)
    res = store.run(spec, build, force=True)
    assert not res.reused and res.artifact.verify().key == art.key
    assert store.run(spec, build).reused


def test_a_damaged_suite_member_needs_force_to_be_imported_again(tmp_path):
    from icl_cli.dictionaries.suite import import_suite

    sys.path.insert(0, str(Path(__file__).parent.parent / "dictionaries"))
    from test_suite import tiny_suite_folder

    folder = tiny_suite_folder(tmp_path / "s", layers=(0,), kinds=("resid",))
    store = Store(tmp_path / "store")
    first = import_suite(store, str(folder), name="t")
    member = store.get(first.member_keys[("resid", 0)])
    _damage(member.file("sae_weights.safetensors"))
    res = CliRunner().invoke(app, ["--store", str(store.root), "store", "import-suite", str(folder), "--name", "t"])
    assert res.exit_code == 3 and "pass --force" in res.output
    res = CliRunner().invoke(app, ["--store", str(store.root), "store", "import-suite", str(folder), "--name", "t", "--force"])
    assert res.exit_code == 0, res.output
    store.get(first.member_keys[("resid", 0)]).verify()


# ---- 2. damaged artifacts can be removed --------------------------------------------------------
def test_gc_sweeps_a_named_artifact_whose_manifest_is_damaged(store, make):
    good = make(store, step="collect", layer=1, name="good")
    bad = make(store, step="clean", lam=0.5, name="bad")
    _damage(bad.path / "manifest.json")
    runner = CliRunner()
    res = runner.invoke(app, ["--store", str(store.root), "store", "show", "bad"])
    assert res.exit_code == 3 and "icl store rm" in res.output
    res = runner.invoke(app, ["--store", str(store.root), "--json", "store", "gc", "--yes"])  # the default grace
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [r["key"] for r in report["removed"]] == [bad.key] and report["names"] == ["bad"]
    assert store.keys() == [good.key] and store.names() == {"good": good.key}


def test_store_rm_removes_a_damaged_artifact_and_its_names(store, make):
    art = make(store, step="clean", lam=0.5, name="mine")
    store.tag(art, "also")
    _damage(art.file("out.json"))
    res = CliRunner().invoke(app, ["--store", str(store.root), "--json", "store", "rm", "mine"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"key": art.key, "names": ["also", "mine"]}
    assert store.keys() == [] and store.names() == {} and not art.path.exists()
    res = CliRunner().invoke(app, ["--store", str(store.root), "store", "rm", "mine"])
    assert res.exit_code == 1 and "no artifact or name 'mine'" in res.output


# ---- 3. gc and running steps ----------------------------------------------------------------------
_READER = """
import sys
from icl_cli.store import Store
Store(sys.argv[1]).resolve(sys.argv[2])   # what a step does with its --clean KEY
print("reading", flush=True)
sys.stdin.read()                           # until the test closes stdin
"""


def test_gc_keeps_what_a_running_step_reads_and_its_lineage(store, make):
    model = make(store, step="import-model", m=1)
    clean = make(store, step="clean", inputs={"model": model}, lam=0.5)
    orphan = make(store, step="collect", layer=9)
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(store.root), clean.key[:10]],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading", reader.stderr.read()
        report = store.gc(older_than_seconds=0)
        assert [r["key"] for r in report.removed] == [orphan.key]
        assert set(store.keys()) == {model.key, clean.key} and report.in_use == 2
        with pytest.raises(IclError, match="being read by a running step"):
            store.remove(clean.key)
    finally:
        reader.kill()
        reader.wait()
    report = store.gc(older_than_seconds=0)  # the reader is gone: its pin file is stale
    assert {r["key"] for r in report.removed} == {model.key, clean.key} and store.keys() == []
    assert len(report.locks) == 1 and report.locks[0].endswith(".pin") and not Path(report.locks[0]).exists()


def test_gc_sweeps_lock_files_nobody_holds_and_keeps_held_ones(store, make):
    stale = store.root / ".locks" / f"{'a' * 64}.lock"
    stale.parent.mkdir(parents=True)
    stale.write_text("999999\n")  # its holder was killed before it could unlink it
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from icl_cli.store.lock import key_lock\n"
         "with key_lock(sys.argv[1], 'b' * 64):\n    print('held', flush=True); sys.stdin.read()", str(store.root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert store.gc(older_than_seconds=0, dry_run=True).locks == [str(stale)] and stale.exists()
        assert store.gc(older_than_seconds=0).locks == [str(stale)]
        assert sorted(p.name for p in (store.root / ".locks").iterdir()) == [f"{'b' * 64}.lock"]
    finally:
        holder.stdin.close()
        holder.wait()


# ---- 4. --force is an atomic replace ----------------------------------------------------------------
def build_with(value):
    def build(st):
        st.write_json("out.json", {"v": value})

    return build


def test_force_replaces_without_a_moment_where_the_artifact_is_missing(store):
    spec = StepSpec("clean", {"lam": 0.5})

    def build(st):
        st.write_json("out.json", {"lam": 0.5})

    key = store.run(spec, build).artifact.key
    stop, failures, reads = threading.Event(), [], [0]

    def read_forever():
        while not stop.is_set():
            try:
                art = Store(store.root).get(key)
                if art is None:
                    failures.append("missing")
                    continue
                json.loads(art.file("out.json").read_text())
                reads[0] += 1
            except (IclError, OSError, ValueError) as exc:
                failures.append(repr(exc))

    t = threading.Thread(target=read_forever)
    t.start()
    try:
        for _ in range(30):
            assert not store.run(spec, build, force=True).reused
    finally:
        stop.set()
        t.join()
    assert failures == [] and reads[0] > 0
    assert store.get(key).verify() and not any((store.root / ".staging").iterdir())


def test_a_writer_killed_after_the_swap_leaves_the_new_artifact(store, monkeypatch):
    from icl_cli.store import staging

    spec = StepSpec("clean", {"lam": 0.5})
    old = store.run(spec, build_with(1)).artifact
    real = staging.remove_tree

    def killed(path):
        if path.parent.name == ".staging":
            raise KeyboardInterrupt  # dies right after the exchange, before deleting the old copy
        real(path)

    monkeypatch.setattr(staging, "remove_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        store.run(spec, build_with(2), force=True)
    monkeypatch.setattr(staging, "remove_tree", real)
    new = store.get(old.key).verify()
    assert json.loads(new.file("out.json").read_text()) == {"v": 2}


def test_force_without_renameat2_still_replaces(store, monkeypatch):
    from icl_cli.store import staging

    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    spec = StepSpec("clean", {"lam": 0.5})
    store.run(spec, build_with(1))
    art = store.run(spec, build_with(2), force=True).artifact
    assert json.loads(art.file("out.json").read_text()) == {"v": 2} and art.verify()
    assert not any((store.root / ".trash").iterdir()) and not any((store.root / ".staging").iterdir())


# ---- 7. exit codes of damage and of a full disk ---------------------------------------------------
def test_a_full_disk_is_one_line_exit_1_and_a_damaged_file_exit_3(store, make, monkeypatch, tmp_path):
    import errno

    make(store, step="collect", layer=1)

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(store.root / ".names" / "x"))

    monkeypatch.setattr(Store, "artifacts", full)
    res = CliRunner().invoke(app, ["--store", str(store.root), "store", "ls"])
    assert res.exit_code == 1 and "no space left on the device" in res.output
    assert "internal error" not in res.output and len(res.output.strip().splitlines()) == 1

    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file" * 8)

    def damaged_h5(self, *a, **k):
        import h5py

        h5py.File(bad, "r")

    monkeypatch.setattr(Store, "artifacts", damaged_h5)
    res = CliRunner().invoke(app, ["--store", str(store.root), "store", "ls"])
    assert res.exit_code == 3 and "HDF5 file is damaged" in res.output and "internal error" not in res.output

    def damaged_st(self, *a, **k):
        from safetensors.torch import load_file

        (tmp_path / "t.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
        load_file(tmp_path / "t.safetensors")

    monkeypatch.setattr(Store, "artifacts", damaged_st)
    res = CliRunner().invoke(app, ["--store", str(store.root), "store", "ls"])
    assert res.exit_code == 3 and "safetensors file is damaged" in res.output and "internal error" not in res.output


def test_a_process_keeps_pin_files_open_in_few_stores_only(tmp_path, make, monkeypatch):
    from icl_cli.store import pins

    monkeypatch.setattr(pins, "MAX_STORES", 2)
    stores = [Store(tmp_path / f"s{i}") for i in range(3)]
    for s in stores:
        s.resolve(make(s, layer=1).key)
    mine = lambda s: [p for p in (s.root / ".pins").glob("*.pin") if p.name.startswith(f"{os.getpid()}.")]  # noqa: E731
    assert [len(mine(s)) for s in stores] == [0, 1, 1]  # the least recently used one was let go
    assert pins.own_pins(stores[0].root) == set() and len(pins.own_pins(stores[2].root)) == 1
