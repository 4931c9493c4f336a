"""Signals (issue 23, item 8): SIGTERM and SIGHUP end a step like Ctrl-C does (one line, nothing
staged or locked is left behind, exit 128 + signal); Ctrl-C during start-up prints no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _icl(*args: str) -> subprocess.Popen:
    env = dict(os.environ, ICL_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "icl_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        if text in line:
            return seen
    proc.kill()
    raise AssertionError(f"never saw {text!r}: {seen}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_step_cleans_up_like_ctrl_c(tmp_path, tiny_toy_dir, sig):
    store = tmp_path / "store"
    proc = _icl("--store", str(store), "train-sae", "--model", str(tiny_toy_dir), "--layer", "1", "--width", "64",
                "--tokens", str(10**8), "--batch-tokens", "128", "--ctx", "32", "--dataset", "tasks",
                "--checkpoint-every", "0")
    _wait_for(proc, "computing")
    time.sleep(0.5)  # inside the build: a staging folder and the key's lock exist now
    assert any((store / ".staging").iterdir()) and any((store / ".locks").iterdir())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"terminated ({signal.Signals(sig).name}); nothing partial was written" in err and "Traceback" not in err
    assert list((store / ".staging").iterdir()) == [] and list((store / ".locks").iterdir()) == []
    assert not [p for p in store.iterdir() if not p.name.startswith(".")]  # nothing published


def test_ctrl_c_while_the_commands_load_prints_one_line(tmp_path):
    icl = str(Path(sys.executable).with_name("icl"))
    subprocess.run([icl, "--version"], capture_output=True, check=True)  # compiled once: no .pyc writes below
    # from here on the commands' import is under the CLI's own handling; what comes before it is the
    # interpreter starting (measured under the current load), which no program can handle
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import icl_cli.cli"], check=True)
    ready = 1.5 * (time.perf_counter() - started)
    interrupted = 0
    for extra in (0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.45):
        proc = subprocess.Popen([icl, "--store", str(tmp_path / "store"), "store", "ls"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, ICL_THREADS="1"))
        time.sleep(ready + extra)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, (ready + extra, err)
        # -SIGINT: it came after the command was done, as the interpreter exited (nothing left to handle it)
        assert proc.returncode in (0, 130, -signal.SIGINT), (ready + extra, proc.returncode, err)
        assert len(err.strip().splitlines()) <= 1, (ready + extra, err)
        interrupted += proc.returncode == 130
    assert interrupted  # the signal did arrive while the command was starting
