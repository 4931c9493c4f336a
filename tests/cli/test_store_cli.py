"""``icl store ...`` through Typer's runner: stdout holds only the result, stderr the rest,
exit codes 0 / 1 (domain error) / 2 (usage) / 3 (integrity)."""

from __future__ import annotations

import json
import os
import re

import h5py
import pytest
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.store import StepSpec, Store

KEY = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture
def root(tmp_path):
    return tmp_path / "store"


def icl(root, *args):
    return CliRunner().invoke(app, ["--store", str(root), *args])


def _publish(root, step="collect", name=None, **params):
    def build(st):
        st.write_json("out.json", params)

    return Store(root).run(StepSpec(step, params), build, name=name).artifact


@pytest.fixture
def tv_file(tmp_path):
    path = tmp_path / "tv.h5"
    with h5py.File(path, "w") as f:
        f["tv"] = [1.0, 2.0, 3.0]
    return path


def test_import_q_prints_only_the_key_and_logs_go_to_stderr(root, tv_file):
    res = icl(root, "-q", "store", "import", str(tv_file), "--kind", "tv", "--name", "tv1")
    assert res.exit_code == 0, res.stderr
    assert KEY.match(res.stdout.strip()) and res.stdout.count("\n") == 1
    again = icl(root, "store", "import", str(tv_file), "--kind", "tv")
    assert again.exit_code == 0 and "reusing" in again.stderr and "reusing" not in again.stdout
    assert res.stdout.strip() in again.stdout


def test_ls_json_q_and_table(root):
    a = _publish(root, "collect", name="tv-a", layer=1)
    b = _publish(root, "train-sae", layer=2)
    res = icl(root, "--json", "store", "ls")
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert {r["key"] for r in rows} == {a.key, b.key}
    assert next(r for r in rows if r["key"] == a.key)["names"] == ["tv-a"]
    q = icl(root, "-q", "store", "ls", "--step", "train-sae")
    assert q.stdout.splitlines() == [b.key]
    table = icl(root, "store", "ls")
    assert a.key[:12] in table.stdout and "tv-a" in table.stdout and table.stderr == ""
    empty = icl(root, "store", "ls", "--step", "clean")
    assert empty.exit_code == 0 and empty.stdout.strip() == "" and "no artifacts" in empty.stderr


def test_show_json_has_manifest_path_and_lineage(root):
    model = _publish(root, "import-model", name="toy", m=1)
    tv = Store(root).run(StepSpec("collect", {"layer": 1}, {"model": "toy"}), lambda st: None).artifact
    res = icl(root, "--json", "store", "show", tv.key[:8], "--tree")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["key"] == tv.key and data["manifest"]["inputs"] == {"model": model.key}
    assert os.path.isabs(data["path"]) and os.path.isdir(data["path"])
    assert data["lineage"]["inputs"]["model"]["key"] == model.key
    human = icl(root, "store", "show", tv.key[:8], "--tree")
    assert human.exit_code == 0 and f"model: {model.key[:12]}" in human.stdout and "[toy]" in human.stdout


def test_unknown_ref_is_one_line_on_stderr_and_exit_1(root):
    _publish(root, name="tv-antonyms", layer=1)
    res = icl(root, "--json", "store", "show", "tv-antonym")
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "did you mean: tv-antonyms" in res.stderr
    assert "Traceback" not in res.stderr


def test_verify_exit_3_names_the_damaged_file(root):
    art = _publish(root, layer=1)
    ok = icl(root, "--json", "store", "verify", "--all")
    assert ok.exit_code == 0 and json.loads(ok.stdout)[0]["ok"] is True
    assert json.loads(icl(root, "--json", "store", "verify").stdout) == json.loads(ok.stdout)  # no REF: every artifact
    path = art.file("out.json")
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0x20
    path.write_bytes(bytes(data))
    bad = icl(root, "--json", "store", "verify", art.key[:10])
    assert bad.exit_code == 3
    assert json.loads(bad.stdout)[0]["problems"] == ["out.json (sha256 mismatch)"]
    assert "out.json" in bad.stderr and "damaged" in bad.stderr


def test_usage_errors_exit_2(root):
    assert icl(root, "store", "verify", "x", "--all").exit_code == 2  # REF and --all
    assert icl(root, "store", "gc", "--older-than", "soon", "--dry-run").exit_code == 2
    res = icl(root, "store", "import", "x", "--kind", "weights")
    assert res.exit_code == 2 and "not a kind" in res.stderr and res.stdout == ""


def test_gc_needs_yes_and_keeps_named(root):
    keep = _publish(root, name="keep", layer=1)
    drop = _publish(root, layer=2)
    no = icl(root, "store", "gc", "--older-than", "0s")
    assert no.exit_code == 1 and "--yes" in no.stderr and no.stdout == ""
    assert len(Store(root).keys()) == 2
    dry = icl(root, "--json", "store", "gc", "--dry-run", "--older-than", "0s")
    assert [r["key"] for r in json.loads(dry.stdout)["removed"]] == [drop.key]
    assert len(Store(root).keys()) == 2
    res = icl(root, "-q", "store", "gc", "--yes", "--older-than", "0s")
    assert res.exit_code == 0 and res.stdout.splitlines() == [drop.key]
    assert Store(root).keys() == [keep.key]
    assert icl(root, "-q", "store", "gc", "--yes").stdout == ""  # default grace 14d: nothing to do


def test_tag_and_export(root, tmp_path):
    art = _publish(root, layer=1)
    res = icl(root, "-q", "store", "tag", art.key[:7], "best")
    assert res.exit_code == 0 and res.stdout.strip() == art.key
    out = icl(root, "--json", "store", "export", "best", str(tmp_path / "out"))
    assert out.exit_code == 0 and json.loads(out.stdout)["path"] == str(tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").exists()
    again = icl(root, "store", "export", "best", str(tmp_path / "out"))
    assert again.exit_code == 1 and "already exists" in again.stderr
