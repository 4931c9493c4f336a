"""`icl models ls` through the real app: table, JSON, -q, exit codes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from icl_cli.cli.app import app

runner = CliRunner()


def test_ls_table():
    r = runner.invoke(app, ["models", "ls"])
    assert r.exit_code == 0, r.output
    for text in ("gemma-1-2b-it", "google/gemma-2b-it", "microsoft/Phi-3-mini-4k-instruct", "2304", "toy-icl"):
        assert text in r.stdout


def test_ls_json():
    r = runner.invoke(app, ["--json", "models", "ls"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    by_name = {row["name"]: row for row in rows}
    assert by_name["gemma-2-9b"] == {**by_name["gemma-2-9b"], "hf_id": "google/gemma-2-9b", "family": "gemma2",
                                    "n_layers": 42, "d_model": 3584}
    assert set(rows[0]) >= {"name", "hf_id", "family", "n_layers", "d_model"}


def test_ls_quiet_prints_names_only():
    r = runner.invoke(app, ["-q", "models", "ls"])
    assert r.exit_code == 0
    assert "gemma-1-2b" in r.stdout.split()


def test_usage_errors_exit_2():
    assert runner.invoke(app, ["models", "nope"]).exit_code == 2
    assert runner.invoke(app, ["models", "ls", "--bogus"]).exit_code == 2
