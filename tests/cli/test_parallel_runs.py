"""Two processes computing the same artifact at once both succeed and leave one artifact.

For `collect`, `clean` and `train-sae` (two layers): learn the key(s) of a tiny run, remove the
artifact again, then hold the key's lock here while a real `icl` subprocess and this process (the
command run in a thread) both ask for it; once both are queued on the lock, let go. The race then
does not depend on timing: one computes, the other waits and reuses, and nothing is left in
.staging, .work or .locks.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from pathlib import Path

from typer.testing import CliRunner

from icl_cli.cli.app import app
from icl_cli.store import Store
from icl_cli.store import lock as lock_mod

runner = CliRunner()


def _icl(store: Path, *args: str):
    """An in-process `icl ARGS -q` (global options after the subcommand)."""
    return runner.invoke(app, [*args, "-q", "--store", str(store)])


def _keys(store: Path, *args: str) -> list[str]:
    res = _icl(store, *args)
    assert res.exit_code == 0, res.stderr
    return res.stdout.split()


def _computed_by_one(errs: list[str], key: str) -> None:
    def said(err: str, verb: str) -> bool:
        return any(line.startswith(f"{verb} {key[:12]}") for line in err.splitlines())

    assert [said(err, "computing") for err in errs].count(True) == 1, errs
    assert all(said(err, "reusing") for err in errs if not said(err, "computing")), errs


def test_parallel_collect_clean_and_train_sae(tmp_path, tiny_toy_dir, monkeypatch):
    from icl_cli.dictionaries import DictConfig, build
    from icl_cli.dictionaries.io import save_saelens

    model = str(tiny_toy_dir)
    # 1. the keys of three tiny runs, each in its own store
    collect = ["collect", "--model", model, "--tasks", "antonyms,en_fr", "--layers", "0-1", "--n-shot", "3",
               "--n-prompts", "2", "--n-eval", "4"]
    tv = _keys(tmp_path / "k", "collect", "--model", model, "--tasks", "en_fr", "--layers", "1", "--n-shot", "3",
               "--n-prompts", "2", "--n-eval", "4")[0]
    sae = save_saelens(build(DictConfig(d_in=32, d_sae=64, arch="standard", site="resid_pre", layer=1)), tmp_path / "sae")
    sae_key = _keys(tmp_path / "k", "store", "import", str(sae), "--kind", "sae")[0]
    clean = ["clean", "--tv", tv, "--sae", sae_key, "--l1", "0.01", "--max-steps", "5", "--patience", "5"]
    train = ["train-sae", "--model", model, "--layer", "0,1", "--width", "64", "--tokens", "512", "--batch-tokens", "256",
             "--ctx", "32", "--eval-tokens", "256", "--dataset", "tasks"]
    runs = [(tmp_path / "c", collect), (tmp_path / "k", clean), (tmp_path / "t", train)]
    runs = [(store, args, _keys(store, *args)) for store, args in runs]
    assert [len(keys) for *_, keys in runs] == [1, 1, 2]
    steps = []
    for store, _, keys in runs:
        steps.append(Store(store).get(keys[0]).step)
        for k in keys:
            assert Store(store)._retire(k)

    # this process says when its command thread is queued on a lock
    queued = threading.Event()
    real = lock_mod.key_lock

    def spy(root, key, on_wait=None):
        def waiting(holder):
            if on_wait is not None:
                on_wait(holder)
            if threading.current_thread() is not threading.main_thread():
                queued.set()

        return real(root, key, on_wait=waiting)

    monkeypatch.setattr(lock_mod, "key_lock", spy)
    monkeypatch.setattr("icl_cli.store.store.key_lock", spy)

    with contextlib.ExitStack() as gates:
        gate = {}
        for store, _, keys in runs:
            gate[store] = gates.enter_context(contextlib.ExitStack())
            gate[store].enter_context(real(store, keys[0]))
        # 2. one subprocess per command, all queued on the gates
        procs = [subprocess.Popen([sys.executable, "-m", "icl_cli", *args, "-q", "--store", str(store)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for store, args, _ in runs]
        seen: list[list[str]] = [[] for _ in procs]
        try:
            for p, lines in zip(procs, seen):
                while not any("waiting for process" in line for line in lines):
                    line = p.stderr.readline()
                    assert line, f"exited before queueing on the lock: {''.join(lines)}{p.stderr.read()}"
                    lines.append(line)
            # 3. per command: the same command in this process, queued too; then open the gate
            for (store, args, keys), p, lines, step in zip(runs, procs, seen, steps):
                queued.clear()
                result = {}
                thread = threading.Thread(target=lambda: result.update(r=_icl(store, *args)))
                thread.start()
                assert queued.wait(120), "the in-process run never queued on the lock"
                gate[store].close()
                thread.join(300)
                out, err = p.communicate(timeout=300)
                mine = result["r"]
                assert p.returncode == 0 and mine.exit_code == 0, (err, mine.stderr)
                assert out.split() == mine.stdout.split() == keys
                s = Store(store)
                assert sorted(a.key for a in s.artifacts(step)) == sorted(keys)  # one artifact per key
                for k in keys:
                    s.get(k).verify()
                for sub in (".staging", ".work", ".locks"):
                    assert not (store / sub).exists() or not any((store / sub).iterdir()), sub
                errs = ["".join(lines) + err, mine.stderr]
                for k in keys:
                    _computed_by_one(errs, k)
                if step == "train-sae":  # the winner trained both layers in one go, the other nothing
                    assert sum("train-sae  steps" in e for e in errs) == 1
        finally:
            for p in procs:
                p.kill()
