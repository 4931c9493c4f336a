"""Task-parallel sweeps (``--shard i/n``): for collect, clean and steer, the shards' partial
artifacts assembled by the command without --shard give the unsharded artifact (same key, every
HDF5 dataset and attribute equal, compared with h5py here), and assembly computes nothing
(the per-task compute functions are replaced by ones that fail). Also: a missing shard is
computed alone, the one-line errors, a damaged partial."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.dictionaries.io import save_saelens
from icl_cli.store import Store

runner = CliRunner()
TASKS = "antonyms,en_fr,singular_plural"


def _collect(model):
    return ["collect", "--model", str(model), "--tasks", TASKS, "--layers", "0-1", "--n-shot", "3", "--n-prompts", "2",
            "--n-eval", "4"]


def _invoke(store, *args):
    out = runner.invoke(app, ["--store", str(store), *args])
    assert out.exit_code == 0, out.stderr or out.output
    return out


def _fail(store, *args) -> str:
    out = runner.invoke(app, ["--store", str(store), *args])
    assert out.exit_code != 0, out.output
    assert "Traceback" not in out.stderr
    return out.stderr.strip()


def h5_tree(path) -> dict:
    """Every dataset (as numpy) and attribute of an HDF5 file, by path; root icl_* attrs left out."""
    out = {}
    with h5py.File(path, "r") as f:
        out["/@"] = {k: v for k, v in f.attrs.items() if not k.startswith("icl_")}

        def visit(name, obj):
            out[f"{name}@"] = dict(obj.attrs.items())
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        f.visititems(visit)
    return out


def assert_same_h5(a, b):
    ta, tb = h5_tree(a), h5_tree(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        va, vb = ta[k], tb[k]
        if isinstance(va, dict):
            assert sorted(va) == sorted(vb), k
            for name in va:
                assert np.array_equal(np.asarray(va[name]), np.asarray(vb[name])), f"{k} {name}"
        else:
            assert np.asarray(va).dtype == np.asarray(vb).dtype, k
            assert np.array_equal(va, vb), k


def _sae(folder, layer=1):
    torch.manual_seed(0)
    d = build(DictConfig(d_in=32, d_sae=48, arch="gated", site="resid_pre", layer=layer))
    with torch.no_grad():
        d.b_mag.fill_(0.05)
    return str(save_saelens(d, folder))


def _forbid(monkeypatch, *targets):
    """Replace per-task compute functions by ones that fail: assembly must not call them."""
    def boom(*a, **k):
        raise AssertionError("assembly recomputed a task")
    for mod, attr in targets:
        monkeypatch.setattr(mod, attr, boom)


@pytest.fixture(scope="module")
def runs(tiny_toy_dir, tmp_path_factory):
    """One store computed unsharded; the reference keys of collect, clean and steer."""
    tmp = tmp_path_factory.mktemp("shard")
    one = tmp / "one"
    sae = _sae(tmp / "sae")
    tv = _invoke(one, "-q", *_collect(tiny_toy_dir)).stdout.strip()
    sae_key = _invoke(one, "-q", "store", "import", sae, "--kind", "sae").stdout.strip()
    clean_args = ["clean", "--tv", tv, "--sae", sae_key, "--max-steps", "4", "--patience", "3", "--l1-grid", "0.1,0.01,0.001",
                  "--l1-tolerance", "0", "--l1-slack", "0", "--n-train", "4", "--n-val", "4"]  # λs differ by task
    clean = _invoke(one, "-q", *clean_args).stdout.strip()
    steer_args = ["steer", "--clean", clean, "--n-prompts", "4", "--min-effect", "0.01"]
    steer = _invoke(one, "-q", *steer_args).stdout.strip()
    neg_args = ["steer", "--clean", clean, "--mode", "negative", "--scales", "0,4", "--n-prompts", "3"]
    neg = _invoke(one, "-q", *neg_args).stdout.strip()
    return {"tmp": tmp, "one": Store(one), "sae": sae, "tv": tv, "clean": clean, "steer": steer, "neg": neg,
            "clean_args": clean_args, "steer_args": steer_args, "neg_args": neg_args}


def _assembled(store: Store, key: str, step: str, n: int):
    art = store.get(key)
    assert art is not None and art.step == step
    parts = art.manifest["metrics"]["assembled_from"]
    assert parts["shards"] == n and len(parts["parts"]) == n
    assert all(store.get(k).step == step + ".part" for k in parts["parts"])
    return art


def test_collect_shards_assemble_to_the_unsharded_artifact(runs, tiny_toy_dir, tmp_path, monkeypatch):
    import icl_cli.collect.vectors as collect

    for n in (2, 3):
        two = tmp_path / f"s{n}"
        part_keys = [_invoke(two, "-q", *_collect(tiny_toy_dir), "--shard", f"{i}/{n}").stdout.strip() for i in range(n)]
        tasks = [Store(two).get(k).params["shard_tasks"] for k in part_keys]
        assert tasks == [TASKS.split(",")[i::n] for i in range(n)]
        with monkeypatch.context() as m:
            _forbid(m, (collect, "collect_task"), (collect, "role_mass"))
            out = _invoke(two, "-q", *_collect(tiny_toy_dir))
        assert out.stdout.strip() == runs["tv"]  # the full key equals the unsharded key
        assert f"assembled {n} shards, 3 tasks, nothing recomputed" in out.stderr
        art = _assembled(Store(two), runs["tv"], "collect", n)
        assert set(Store(two).keys()) == set(part_keys) | {runs["tv"]}
        assert_same_h5(runs["one"].get(runs["tv"]).file("collect.h5"), art.file("collect.h5"))
        assert art.metrics["best_layer"] == runs["one"].get(runs["tv"]).metrics["best_layer"]
        # a shard of a complete artifact computes nothing and prints the full key
        again = _invoke(two, "-q", *_collect(tiny_toy_dir), "--shard", f"0/{n}")
        assert again.stdout.strip() == runs["tv"] and "has nothing to compute" in again.stderr
        # the summary a reader prints is the unsharded one
        js = [_invoke(s, "--json", *_collect(tiny_toy_dir)).stdout for s in (runs["one"].root, two)]
        assert js[0] == js[1]


def _two_stores_with(runs, tmp_path, *keys_of):
    """A new store holding the collect artifact (and SAE) of ``runs``, ready for clean/steer shards."""
    two = tmp_path / "two"
    Store(two).root.mkdir(parents=True)
    import shutil

    for key in keys_of:
        src = runs["one"].get(key).path
        dst = Store(two).artifact_path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst)
    return two


def test_clean_shards_assemble_to_the_unsharded_artifact(runs, tmp_path, monkeypatch):
    import icl_cli.clean.cleaning as clean

    sae_key = runs["one"].get(runs["clean"]).inputs["sae"]
    two = _two_stores_with(runs, tmp_path, runs["tv"], sae_key)
    for i in range(2):
        _invoke(two, "-q", *runs["clean_args"], "--shard", f"{i}/2")
    with monkeypatch.context() as m:
        _forbid(m, (clean, "clean_task"), (clean, "clean_vector"))
        out = _invoke(two, "-q", *runs["clean_args"])
    assert out.stdout.strip() == runs["clean"]
    assert "assembled 2 shards, 3 tasks, nothing recomputed" in out.stderr
    art = _assembled(Store(two), runs["clean"], "clean", 2)
    ref = runs["one"].get(runs["clean"])
    assert_same_h5(ref.file("clean.h5"), art.file("clean.h5"))
    assert {k: v for k, v in art.metrics.items() if k != "assembled_from"} == ref.metrics  # cross-task means recomputed


def test_steer_shards_assemble_to_the_unsharded_artifact(runs, tmp_path, monkeypatch):
    import icl_cli.steer.heatmaps as steer

    clean_art = runs["one"].get(runs["clean"])
    two = _two_stores_with(runs, tmp_path, runs["tv"], clean_art.inputs["sae"], runs["clean"])
    for args, key in ((runs["steer_args"], runs["steer"]), (runs["neg_args"], runs["neg"])):
        for i in range(3):
            _invoke(two, "-q", *args, "--shard", f"{i}/3")
        with monkeypatch.context() as m:
            _forbid(m, (steer, "heatmap_task"), (steer, "negative_task"))
            out = _invoke(two, "-q", *args)
        assert out.stdout.strip() == key
        assert "assembled 3 shards, 3 tasks, nothing recomputed" in out.stderr
        art = _assembled(Store(two), key, "steer", 3)
        assert_same_h5(runs["one"].get(key).file("steer.h5"), art.file("steer.h5"))
    # the executors (a cross-task rule) of the assembled artifact are the unsharded ones
    js = [_invoke(s, "--json", *runs["steer_args"]).stdout for s in (runs["one"].root, two)]
    assert js[0] == js[1]


def test_missing_shard_is_computed_alone(runs, tiny_toy_dir, tmp_path, monkeypatch):
    import icl_cli.collect.vectors as collect

    two = tmp_path / "two"
    _invoke(two, "-q", *_collect(tiny_toy_dir), "--shard", "1/3")
    done = []
    real = collect.collect_task
    monkeypatch.setattr(collect, "collect_task", lambda hm, tok, task, *a, **k: done.append(task.name) or real(hm, tok, task, *a, **k))
    out = _invoke(two, "-q", *_collect(tiny_toy_dir))
    assert sorted(done) == ["antonyms", "singular_plural"]  # shards 0/3 and 2/3; en_fr (1/3) was reused
    assert "shard 0/3 is missing" in out.stderr and "shard 2/3 is missing" in out.stderr
    assert "assembled 3 shards, 3 tasks, 2 task(s) of missing shards computed here" in out.stderr
    assert out.stdout.strip() == runs["tv"]
    assert_same_h5(runs["one"].get(runs["tv"]).file("collect.h5"), Store(two).get(runs["tv"]).file("collect.h5"))


def test_shard_errors(runs, tiny_toy_dir, tmp_path):
    s = tmp_path / "s"
    args = _collect(tiny_toy_dir)
    assert "--shard takes i/n" in _fail(s, *args, "--shard", "one/two")
    assert "below the number of shards (0-1)" in _fail(s, *args, "--shard", "2/2")
    assert "shard(s) 3/5, 4/5 would have no task" in _fail(s, *args, "--shard", "0/5")
    # mixed counts, none complete: the one-line error says what is missing
    _invoke(s, "-q", *args, "--shard", "0/2")
    _invoke(s, "-q", *args, "--shard", "0/3")
    err = _fail(s, *args)
    assert "2 shards: missing 1/2" in err and "3 shards: missing 1/3, 2/3" in err
    # completing one set lets assembly pick it
    _invoke(s, "-q", *args, "--shard", "1/2")
    assert _invoke(s, "-q", *args).stdout.strip() == runs["tv"]


def test_damaged_partial_is_refused(runs, tiny_toy_dir, tmp_path):
    import os

    s = tmp_path / "s"
    keys = [_invoke(s, "-q", *_collect(tiny_toy_dir), "--shard", f"{i}/2").stdout.strip() for i in range(2)]
    path = Store(s).get(keys[1]).file("collect.h5")
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"garbage!")
    err = _fail(s, *_collect(tiny_toy_dir))
    assert "partial 1/2" in err and "fails verification" in err and "--shard 1/2 --force" in err
