"""`icl circuit` over several tasks: --shard i/n computes the circuits of tasks[i::n] (one artifact
each, equal to the one-task command's); without --shard every existing circuit is reused and only
the missing ones are computed, and every key is printed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.store import Store
from tests.circuit.helpers import tiny_suite, write_suite
from tests.scale.test_shard import assert_same_h5

FAST = ["--n-prompts", "2", "--n-shot", "3", "--edge-nodes", "20"]
TASKS = ["antonyms", "en_fr"]


def icl(store, *args):
    r = CliRunner().invoke(app, ["--store", str(store), *args])
    assert r.exit_code == 0, r.stderr or r.output
    return r


@pytest.fixture(scope="module")
def ref(tiny_toy_dir, tmp_path_factory):
    """The circuits of each task made one at a time with `--task T` (the unsharded reference)."""
    tmp = tmp_path_factory.mktemp("shard_circuit")
    suite = write_suite(tmp / "suite", tiny_suite(32, range(3), d_sae=24, model=str(tiny_toy_dir)), model=str(tiny_toy_dir))
    base = ["circuit", "--model", str(tiny_toy_dir), "--saes", str(suite), *FAST]
    keys = {t: json.loads(icl(tmp / "one", "--json", *base, "--task", t).stdout)["key"] for t in TASKS}
    return {"base": base, "keys": keys, "one": Store(tmp / "one")}


def _forbid(monkeypatch):
    import icl_cli.circuit.compute as compute

    def boom(*a, **k):
        raise AssertionError("a circuit was recomputed")
    monkeypatch.setattr(compute, "compute_circuit", boom)


def test_shards_then_reuse_every_circuit(ref, tmp_path, monkeypatch):
    base, keys = ref["base"], ref["keys"]
    two = tmp_path / "two"
    got = [icl(two, "-q", *base, "--task", ",".join(TASKS), "--shard", f"{i}/2").stdout.split() for i in range(2)]
    assert got == [[keys["antonyms"]], [keys["en_fr"]]]  # shard i: tasks[i::2], the one-task command's keys
    for t in TASKS:
        art = Store(two).get(keys[t])
        assert art.step == "circuit" and art.params["task"] == t
        assert_same_h5(ref["one"].get(keys[t]).file("circuit.h5"), art.file("circuit.h5"))
    with monkeypatch.context() as m:
        _forbid(m)
        r = icl(two, "-q", *base, "--task", ",".join(TASKS))
    assert r.stdout.split() == [keys[t] for t in TASKS]
    assert "circuits of 2 task(s): 2 reused, 0 computed" in r.stderr
    data = json.loads(icl(two, "--json", *base, "--task", ",".join(TASKS)).stdout)
    assert [c["task"] for c in data["circuits"]] == TASKS and [c["key"] for c in data["circuits"]] == [keys[t] for t in TASKS]
    assert "circuits, one per task" in icl(two, *base, "--task", ",".join(TASKS)).stdout


def test_missing_circuits_only_are_computed(ref, tmp_path, monkeypatch):
    import icl_cli.circuit.compute as compute

    base, keys = ref["base"], ref["keys"]
    two = tmp_path / "two"
    icl(two, "-q", *base, "--task", ",".join(TASKS), "--shard", "1/2")
    done = []
    real = compute.compute_circuit
    monkeypatch.setattr(compute, "compute_circuit", lambda hm, tok, task, *a, **k: done.append(task.name) or real(hm, tok, task, *a, **k))
    r = icl(two, "-q", *base, "--task", ",".join(TASKS))
    assert done == ["antonyms"] and "1 reused, 1 computed" in r.stderr
    assert r.stdout.split() == [keys[t] for t in TASKS]


def test_several_tasks_errors(ref, tmp_path):
    base = ref["base"]
    for extra, words in ((["--estimate"], "--estimate is for one --task"), (["--name", "x"], "--name names one artifact"),
                         (["--shard", "0/3"], "shard(s) 2/3 would have no task")):
        r = CliRunner().invoke(app, ["--store", str(tmp_path), *base, "--task", ",".join(TASKS), *extra])
        assert r.exit_code == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
