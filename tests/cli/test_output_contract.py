"""The output contract: global options anywhere on the line, -q changes stdout only, usage errors
are one line on stderr (exit 2), bad inputs are one line (exit 1), never an internal error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from icl_cli.cli.app import _Boundary, app
from icl_cli.cli.argv import hoist_globals

runner = CliRunner()
ROOT = typer.main.get_command(app)


def _leaf_paths(cmd, path=()):
    subs = getattr(cmd, "commands", None)
    if not subs or getattr(cmd, "invoke_without_command", False):  # `icl collect` runs on its own too
        if path:
            yield list(path)
    if not subs:
        return
    for name, sub in sorted(subs.items()):
        yield from _leaf_paths(sub, (*path, name))


def _error_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


# ---- global options after the subcommand ---------------------------------------------------------
def test_json_and_quiet_after_the_subcommand_mean_the_same():
    before, after = runner.invoke(app, ["--json", "tasks", "ls"]), runner.invoke(app, ["tasks", "ls", "--json"])
    assert before.exit_code == after.exit_code == 0, after.stderr
    assert json.loads(after.stdout) == json.loads(before.stdout) and len(json.loads(after.stdout)) >= 20
    q_before, q_after = runner.invoke(app, ["-q", "models", "ls"]), runner.invoke(app, ["models", "ls", "-q"])
    assert q_after.exit_code == 0 and q_after.stdout == q_before.stdout
    assert "gemma" in q_after.stdout and "│" not in q_after.stdout  # names only, no table


def test_store_option_after_the_subcommand(tmp_path):
    from icl_cli.store import StepSpec, Store

    key = Store(tmp_path / "s").run(StepSpec("x", {"a": 1}), lambda st: {"n": st.write_json("o.json", {}).stat().st_size}).artifact.key
    env = {"ICL_STORE": str(tmp_path / "elsewhere")}
    for args in (["store", "ls", "--json", "--store", str(tmp_path / "s")], ["store", "ls", f"--store={tmp_path / 's'}", "-q"]):
        res = runner.invoke(app, args, env=env)
        assert res.exit_code == 0 and key in res.stdout, res.stderr
    assert key not in runner.invoke(app, ["store", "ls", "-q"], env=env).stdout


def test_every_command_accepts_the_global_options_after_it(tmp_path):
    """Walks the whole command tree, so commands added later are covered too."""
    leaves = list(_leaf_paths(ROOT))
    assert len(leaves) >= 15 and ["collect"] in leaves and ["store", "gc"] in leaves
    tail = ["--json", "-q", "-v", "--store", str(tmp_path), "--seed", "7", "--device", "cpu", "--dtype", "float32"]
    for path in leaves:
        ctx = ROOT.make_context("icl", [*path, *tail])
        p = ctx.params
        assert (p["json_out"], p["quiet"], p["verbose"], p["store"], p["seed"], p["device"], p["dtype"]) == (
            True, True, True, tmp_path, 7, "cpu", "float32"), path
        rest = list(getattr(ctx, "_protected_args", [])) + list(ctx.args)
        assert rest == path, (path, rest)  # nothing of the tail is left for the subcommand


def test_option_values_and_the_double_dash_are_left_alone():
    # `--name -q`: -q is the name, not the global flag
    assert hoist_globals(ROOT, None, ["collect", "--name", "-q", "--json"]) == ["--json", "collect", "--name", "-q"]
    assert hoist_globals(ROOT, None, ["collect", "--name=-q"]) == ["collect", "--name=-q"]
    assert hoist_globals(ROOT, None, ["tasks", "show", "--", "-q"]) == ["tasks", "show", "--", "-q"]
    # a global given before and after: the later one is parsed last, so it wins (like any repeated option)
    assert hoist_globals(ROOT, None, ["--seed", "1", "tasks", "ls", "--seed", "2"]) == ["--seed", "1", "--seed", "2", "tasks", "ls"]
    # the value of a root option is never taken for a subcommand name
    assert hoist_globals(ROOT, None, ["--store", "tasks", "tasks", "ls", "-q"]) == ["--store", "tasks", "-q", "tasks", "ls"]
    assert hoist_globals(ROOT, None, ["nope", "--json"]) == ["nope", "--json"]  # unknown: click reports it


def test_a_subcommands_own_option_of_the_same_name_wins():
    t = typer.Typer(cls=_Boundary)
    seen = {}

    @t.callback()
    def main(seed: int = typer.Option(0, "--seed"), quiet: bool = typer.Option(False, "-q")) -> None:
        seen["global"] = (seed, quiet)

    @t.command()
    def run(seed: int = typer.Option(1, "--seed")) -> None:
        seen["own"] = seed

    @t.command()
    def other() -> None:
        pass

    assert runner.invoke(t, ["run", "--seed", "5", "-q"]).exit_code == 0
    assert seen == {"global": (0, True), "own": 5}
    assert runner.invoke(t, ["other", "--seed", "9"]).exit_code == 0 and seen["global"] == (9, False)


# ---- -q changes stdout only ---------------------------------------------------------------------
def test_quiet_keeps_logs_and_progress_on_stderr(capsys, monkeypatch):
    from icl_cli.cli import common
    from icl_cli.cli.context import Globals, log

    gl = Globals(store_path=Path("s"), quiet=True, json=True)
    log("computing abc", ctx_globals=gl)
    clock = iter([0.0, 0.0, 1.0, 2.0, 3.0, 15.0, 16.0, 17.0])  # "…" (where a task is) reads the clock too
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    with common.task_progress(gl, 5, "clean") as advance:  # stderr is not a terminal here
        for name in ("a", "b", "…", "c", "d", "e"):
            advance(name)
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert lines[0] == "computing abc"
    # the first update, the next one after PLAIN_EVERY_S (10 s), and the last
    assert [line.split("  ")[:3] for line in lines[1:]] == [["clean", "a", "1/5"], ["clean", "d", "4/5"], ["clean", "e", "5/5"]]


def test_train_sae_quiet_still_reports_progress(tmp_path, tiny_toy_dir):
    res = runner.invoke(app, ["--store", str(tmp_path), "train-sae", "--model", str(tiny_toy_dir), "--layer", "1",
                              "--width", "64", "--tokens", "1024", "--batch-tokens", "256", "--ctx", "32",
                              "--eval-tokens", "256", "--dataset", "tasks", "-q"])
    assert res.exit_code == 0, res.stderr
    assert len(res.stdout.split()) == 1  # the key alone
    assert "train-sae  steps  4/4" in res.stderr and "computing" in res.stderr


# ---- usage errors: one line, exit 2 -------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--bogus", "tasks", "ls"], "No such option: --bogus"),
    (["tasks", "ls", "--bogus"], "No such option: --bogus"),
    (["nope"], "No such command"),
    (["tasks", "nope"], "No such command"),
    (["--seed", "x", "tasks", "ls"], "--seed"),
    (["tasks", "ls", "--seed", "x"], "--seed"),
    (["collect", "--layers"], "--layers"),
])
def test_usage_errors_are_one_line_exit_2(args, needle):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    lines = _error_lines(res)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert res.stdout == "" and "╭" not in res.stderr and "Usage:" not in res.stderr


# ---- bad inputs: one line, exit 1 -------------------------------------------------------------
def _one_error(res, needle: str) -> None:
    assert res.exit_code == 1, (res.exit_code, res.stderr)
    errors = [line for line in _error_lines(res) if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "internal error" not in res.stderr, res.stderr


def test_backwards_layer_range(tmp_path, tiny_toy_dir):
    from icl_cli.core.layers import parse_layers
    from icl_cli.core.errors import IclError

    assert parse_layers("3-5", 6) == [3, 4, 5] and parse_layers("1,4-5", 6) == [1, 4, 5]
    with pytest.raises(IclError, match="backwards"):
        parse_layers("5-3", 6)
    res = runner.invoke(app, ["--store", str(tmp_path), "collect", "--model", str(tiny_toy_dir), "--tasks", "antonyms",
                              "--layers", "2-1"])
    _one_error(res, "runs backwards")


def test_task_file_not_utf8(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes('[{"input": "café", "output": "x"}]'.encode("latin-1"))
    _one_error(runner.invoke(app, ["tasks", "show", str(bad)]), "not UTF-8")


def test_sae_config_without_d_in(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_sae": 16, "architecture": "standard"}))
    save_file({"W_enc": torch.zeros(8, 16), "W_dec": torch.zeros(16, 8), "b_enc": torch.zeros(16), "b_dec": torch.zeros(8)},
              str(folder / "sae_weights.safetensors"))
    res = runner.invoke(app, ["--store", str(tmp_path / "s"), "store", "import", str(folder), "--kind", "sae"])
    _one_error(res, "no 'd_in'")
    (folder / "cfg.json").write_text(json.dumps({"d_in": 8, "d_sae": "many", "architecture": "standard"}))
    _one_error(runner.invoke(app, ["--store", str(tmp_path / "s"), "store", "import", str(folder), "--kind", "sae"]), "d_sae")
    (folder / "cfg.json").write_text(json.dumps({"d_in": 9, "d_sae": 16, "architecture": "standard"}))  # wrong width
    _one_error(runner.invoke(app, ["--store", str(tmp_path / "s"), "store", "import", str(folder), "--kind", "sae"]), "has shape (8, 16), expected (9, 16)")


def test_gc_with_nothing_to_delete_says_so_and_succeeds(tmp_path):
    res = runner.invoke(app, ["--store", str(tmp_path), "store", "gc"])
    assert res.exit_code == 0, res.stderr
    assert "nothing to delete" in res.stdout
    res = runner.invoke(app, ["--store", str(tmp_path), "store", "gc", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["removed"] == []
