"""verify catches damage; gc keeps named lineage and sweeps the rest."""

from __future__ import annotations

import os

import pytest

from icl_cli.core.errors import IntegrityError


def _flip_one_byte(path):
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_catches_one_flipped_byte(store, make):
    art = make(store, layer=1)
    assert store.verify(art.key[:8]).problems() == []
    _flip_one_byte(art.file("out.json"))
    with pytest.raises(IntegrityError, match=r"out\.json \(sha256 mismatch\)") as exc:
        store.verify(art.key)
    assert exc.value.exit_code == 3


def test_verify_names_missing_and_extra_files_and_a_forged_manifest(store, make):
    art = make(store, layer=1)
    os.chmod(art.path, 0o755)
    (art.path / "stray.bin").write_bytes(b"x")
    os.chmod(art.file("out.json"), 0o644)
    art.file("out.json").unlink()
    assert art.problems() == ["out.json (missing)", "stray.bin (not in the manifest)"]
    art.manifest["params"] = {"layer": 2}  # what a hand-edited manifest would say
    assert any("do not hash to the key" in p for p in art.problems())


def test_gc_keeps_named_lineage_and_removes_the_rest(store, make):
    model = make(store, step="import-model", m=1)
    sae = make(store, step="train-sae", inputs={"model": model}, layer=3)
    tv = make(store, step="collect", inputs={"model": model}, layer=3)
    clean = make(store, step="clean", inputs={"tv": tv, "sae": sae}, lam=0.05, name="paper")
    orphan = make(store, step="collect", inputs={"model": model}, layer=4)
    other_sae = make(store, step="train-sae", inputs={"model": model}, layer=5)
    named = {model.key, sae.key, tv.key, clean.key}

    assert store.gc(older_than_seconds=3600).removed == []  # everything is inside the grace period
    preview = store.gc(older_than_seconds=0, dry_run=True)
    assert {r["key"] for r in preview.removed} == {orphan.key, other_sae.key}
    assert len(store.keys()) == 6  # a dry run deletes nothing

    report = store.gc(older_than_seconds=0)
    assert {r["key"] for r in report.removed} == {orphan.key, other_sae.key}
    assert set(store.keys()) == named and report.protected == 4
    assert not orphan.path.exists() and not any((store.root / ".trash").iterdir())
    for key in named:
        store.get(key).verify()

    store.untag("paper")
    store.gc(older_than_seconds=0)
    assert store.keys() == []


def test_gc_sweeps_idle_work_dirs_and_dangling_names(store, make):
    art = make(store, layer=1, name="keep")
    idle = store.root / ".work" / ("c" * 64)
    idle.mkdir(parents=True)
    (idle / "ckpt").write_bytes(b"x")
    (store.root / ".names" / "ghost").write_text("d" * 64 + "\n")
    assert store.gc(older_than_seconds=0, dry_run=True).names == ["ghost"]
    first = store.gc(older_than_seconds=3600)
    assert first.work == [] and idle.exists()  # a recent checkpoint may still be resumed
    assert first.names == ["ghost"] and store.names() == {"keep": art.key}
    report = store.gc(older_than_seconds=0)
    assert report.work == [str(idle)] and not idle.exists()


def test_gc_keeps_what_young_artifacts_were_made_from(store, make):
    old_model = make(store, step="import-model", m=1)
    young = make(store, step="collect", inputs={"model": old_model}, layer=1)
    # make the model look 30 days old and the collect brand new
    m = dict(old_model.manifest, created="2000-01-01T00:00:00+00:00")
    old_model.path.chmod(0o755)
    (old_model.path / "manifest.json").chmod(0o644)
    (old_model.path / "manifest.json").write_text(__import__("json").dumps(m))
    report = store.gc(older_than_seconds=3600)
    assert report.removed == [] and set(store.keys()) == {old_model.key, young.key}


def test_a_folder_with_a_broken_manifest_is_reported_and_swept(store, make):
    good, bad = make(store, layer=1), make(store, layer=2)
    bad.path.chmod(0o755)
    (bad.path / "manifest.json").chmod(0o644)
    (bad.path / "manifest.json").write_text("{truncated")
    assert [a.key for a in store.artifacts()] == [good.key]
    assert list(store.damaged()) == [bad.key]
    with pytest.raises(IntegrityError, match="unreadable"):
        store.resolve(bad.key)
    report = store.gc(older_than_seconds=0)
    assert [r["key"] for r in report.removed] == [good.key, bad.key] and store.damaged() == {}
