"""Two `icl` processes computing the same artifact at once both succeed and leave one artifact.

Each test first learns the key(s) of a tiny run, removes the artifact again, then holds the key's
lock itself while it starts two real `icl` processes, so that both are certainly queued on the
same key when it lets go (a race that does not depend on timing). One computes, the other waits
and reuses; nothing is left in .staging, .work or .locks.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.store import Store
from icl_cli.store.lock import key_lock

runner = CliRunner()


def _icl(store: Path, *args: str) -> list[str]:
    """Keys printed by an in-process `icl ... -q` (global options after the subcommand)."""
    res = runner.invoke(app, [*args, "-q", "--store", str(store)])
    assert res.exit_code == 0, res.stderr
    return res.stdout.split()


def _start(store: Path, keys: list[str], args: list[str]) -> dict:
    """Remove the artifacts of ``keys``, then start two `icl ARGS -q` processes (while the caller
    holds the lock of keys[0]) and wait until both are queued on a lock."""
    s = Store(store)
    step = s.get(keys[0]).step
    for k in keys:
        assert s._retire(k)
    cmd = [sys.executable, "-m", "icl_cli", *args, "-q", "--store", str(store)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    return {"store": store, "keys": keys, "step": step, "procs": procs, "seen": [[], []]}


def _queued(run: dict) -> None:
    for p, lines in zip(run["procs"], run["seen"]):
        while not any("waiting for process" in line for line in lines):
            line = p.stderr.readline()
            assert line, f"exited before queueing on the lock: {''.join(lines)}{p.stderr.read()}"
            lines.append(line)


def _finish(run: dict) -> list[tuple[str, str]]:
    """Both processes succeeded, printed the keys, and left one intact artifact per key, no scratch."""
    store, keys, procs = run["store"], run["keys"], run["procs"]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [(out, "".join(lines) + err) for (out, err), lines in zip(outs, run["seen"])]
    for out, _ in results:
        assert out.split() == keys
    s = Store(store)
    assert sorted(a.key for a in s.artifacts(run["step"])) == sorted(keys)  # one artifact per key
    for k in keys:
        s.get(k).verify()
    for sub in (".staging", ".work", ".locks"):
        folder = store / sub
        assert not folder.exists() or not any(folder.iterdir()), sub
    return results


def _computed_by_one(results, key: str) -> None:
    def said(err: str, verb: str) -> bool:
        return any(line.startswith(f"{verb} {key[:12]}") for line in err.splitlines())

    assert [said(err, "computing") for _, err in results].count(True) == 1, [err for _, err in results]
    assert all(said(err, "reusing") for _, err in results if not said(err, "computing"))


def test_parallel_collect_clean_and_train_sae(tmp_path, tiny_toy_dir):
    from icl_cli.dictionaries import DictConfig, build
    from icl_cli.dictionaries.io import save_saelens

    model = str(tiny_toy_dir)
    # learn the keys of three tiny runs (in this process), each in its own store
    collect = ["collect", "--model", model, "--tasks", "antonyms,en_fr", "--layers", "0-1", "--n-shot", "3",
               "--n-prompts", "2", "--n-eval", "4"]
    collect_keys = _icl(tmp_path / "c", *collect)
    tv = _icl(tmp_path / "k", "collect", "--model", model, "--tasks", "en_fr", "--layers", "1", "--n-shot", "3",
              "--n-prompts", "2", "--n-eval", "4")[0]
    sae = save_saelens(build(DictConfig(d_in=32, d_sae=64, arch="standard", site="resid_pre", layer=1)), tmp_path / "sae")
    sae_key = _icl(tmp_path / "k", "store", "import", str(sae), "--kind", "sae")[0]
    clean = ["clean", "--tv", tv, "--sae", sae_key, "--l1", "0.01", "--max-steps", "5", "--patience", "5"]
    clean_keys = _icl(tmp_path / "k", *clean)
    train = ["train-sae", "--model", model, "--layer", "0,1", "--width", "64", "--tokens", "512", "--batch-tokens", "256",
             "--ctx", "32", "--eval-tokens", "256", "--dataset", "tasks"]
    train_keys = _icl(tmp_path / "t", *train)
    assert len(collect_keys) == len(clean_keys) == 1 and len(train_keys) == 2

    # all six processes at once, each pair gated on its first key's lock held here
    with contextlib.ExitStack() as gates:
        runs = []
        for store, keys, args in ((tmp_path / "c", collect_keys, collect), (tmp_path / "k", clean_keys, clean),
                                  (tmp_path / "t", train_keys, train)):
            gates.enter_context(key_lock(store, keys[0]))
            runs.append(_start(store, keys, args))
        try:
            for run in runs:
                _queued(run)
        except BaseException:
            for run in runs:
                for p in run["procs"]:
                    p.kill()
            raise
    for run in runs:
        results = _finish(run)
        for k in run["keys"]:
            _computed_by_one(results, k)
    # the train-sae winner trained both layers in one go; the other process trained nothing
    assert sum("train-sae  steps" in err for _, err in results) == 1
