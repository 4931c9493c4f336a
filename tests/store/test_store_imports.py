"""import (content-keyed, reused on re-import, checked per kind) and export (writable copies)."""

from __future__ import annotations

import json
import os
import stat

import h5py
import numpy as np
import pytest
from safetensors.numpy import save_file

from icl_cli.core.errors import IclError
from icl_cli.store import imports


@pytest.fixture
def tv_file(tmp_path):
    path = tmp_path / "tv.h5"
    with h5py.File(path, "w") as f:
        f["antonyms"] = np.ones((3, 8), dtype=np.float32)
    return path


def test_import_tv_is_keyed_by_content_and_reused(store, tv_file, tmp_path):
    res = store.import_path(tv_file, "tv", name="my-tv")
    art = res.artifact
    assert not res.reused and art.step == "import-tv" and art.names == ["my-tv"]
    assert art.params["content"] == {"tv.h5": art.files["tv.h5"]["sha256"]}
    assert art.metrics["source"] == str(tv_file)
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    (copy / "tv.h5").write_bytes(tv_file.read_bytes())
    again = store.import_path(copy / "tv.h5", "tv")
    assert again.reused and again.artifact.key == art.key  # same bytes, same key
    with h5py.File(tv_file, "a") as f:
        f["antonyms"][0, 0] = 2.0
    assert store.import_path(tv_file, "tv").artifact.key != art.key


def test_import_checks_the_source(store, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    with pytest.raises(IclError, match="not an HDF5 file"):
        store.import_path(bad, "tv")
    with pytest.raises(IclError, match="config.json"):
        store.import_path(tmp_path, "model")
    with pytest.raises(IclError, match="unknown import kind"):
        store.import_path(bad, "weights")
    with pytest.raises(IclError, match="does not exist"):
        store.import_path(tmp_path / "missing", "tv")
    tasks = tmp_path / "t.json"
    tasks.write_text(json.dumps([{"input": "hot", "wrong": "cold"}]))
    with pytest.raises(IclError, match="not a task file"):
        store.import_path(tasks, "tasks")
    assert store.keys() == []


def test_import_tasks_and_model_folders(store, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "a.json").write_text(json.dumps({"hot": "cold"}))
    (tasks / "b.json").write_text(json.dumps([{"input": "up", "output": "down"}]))
    art = store.import_path(tasks, "tasks").artifact
    assert sorted(art.files) == ["a.json", "b.json"]
    model = tmp_path / "model"
    (model / ".cache").mkdir(parents=True)
    (model / ".cache" / "lock").write_text("")
    (model / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    art = store.import_path(model, "model").artifact
    assert sorted(art.files) == ["config.json", "model.safetensors"]  # hidden folders skipped


def test_import_sae_folder_copied_when_no_converter(store, tmp_path, monkeypatch):
    monkeypatch.setitem(imports.KINDS, "sae", imports.Kind("sae", "", imports._sae_files))
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8}))
    save_file({"W_enc": np.zeros((4, 8), np.float32)}, str(sae / "sae_weights.safetensors"))
    art = store.import_path(sae, "sae").artifact
    assert art.step == "import-sae" and art.params["via"] == "copy"
    assert sorted(art.files) == ["cfg.json", "sae_weights.safetensors"]
    (sae / "cfg.json").unlink()
    with pytest.raises(IclError, match="SAELens folder"):
        store.import_path(sae, "sae")


def test_import_sae_uses_the_converter_when_there_is_one(store, tmp_path, monkeypatch):
    def convert(src, dest):
        (dest / "cfg.json").write_text("{}")
        return {"d_sae": 8}

    monkeypatch.setitem(imports.KINDS, "sae", imports.Kind("sae", "", imports._sae_files, lambda: convert))
    src = tmp_path / "authors.safetensors"
    src.write_bytes(b"weights")
    art = store.import_path(src, "sae").artifact
    assert art.params["via"] == "convert" and art.metrics["d_sae"] == 8 and list(art.files) == ["cfg.json"]


def test_export_copies_writable_files_and_the_manifest(store, tmp_path, make):
    art = make(store, layer=1, name="tv")
    dest = store.export("tv", tmp_path / "out")
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "out.json"]
    assert json.loads((dest / "manifest.json").read_text())["key"] == art.key
    for p in [dest, dest / "out.json"]:
        assert os.access(p, os.W_OK) and stat.S_IMODE(p.stat().st_mode) & 0o200
    with pytest.raises(IclError, match="already exists"):
        store.export("tv", dest)
