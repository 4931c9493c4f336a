"""icl tasks ls / show through the CLI runner: stdout contract, roles JSON, errors."""

import json

from typer.testing import CliRunner

from icl_cli.cli.app import app

runner = CliRunner()


def test_ls_json_lists_the_23_builtin_tasks():
    res = runner.invoke(app, ["--json", "tasks", "ls"])
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert len(rows) == 23 and {"name", "group", "size"} <= set(rows[0])
    assert {r["group"] for r in rows} == {"knowledge", "linguistic", "translation", "algorithmic"}
    table = runner.invoke(app, ["tasks", "ls"])
    assert "country_capital" in table.stdout and table.stderr == ""


def test_show_json_gives_tokens_ids_and_roles(tiny_toy_dir):
    res = runner.invoke(app, ["--json", "tasks", "show", "antonyms", "--model", str(tiny_toy_dir), "--n-shot", "2"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert len(data["tokens"]) == len(data["ids"]) == len(data["roles"])
    assert data["roles"].count("arrow") == 3 and data["roles"].count("input") == 3
    assert data["tokens"][data["roles"].index("arrow")] == "->"
    assert set(data["roles"]) <= {None, "prompt", "input", "arrow", "output", "newline"}
    plain = runner.invoke(app, ["tasks", "show", "en_fr", "--model", str(tiny_toy_dir)])
    assert plain.exit_code == 0 and "->" in plain.stdout


def test_show_errors_are_one_line(tmp_path, tiny_toy_dir):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": "b",\n "c": }')
    res = runner.invoke(app, ["tasks", "show", str(bad), "--model", str(tiny_toy_dir)])
    assert res.exit_code == 1 and "bad.json: malformed JSON at line 2" in res.stderr and res.stdout == ""
    res = runner.invoke(app, ["tasks", "show", "antonyms", "--model", str(tiny_toy_dir), "--n-shot", "5000"])
    assert res.exit_code == 1 and "n-shot can be at most" in res.stderr
    res = runner.invoke(app, ["tasks", "show", "antonyms", "--model", str(tiny_toy_dir), "--template", "nope"])
    assert res.exit_code == 1 and "unknown template" in res.stderr
    words = tmp_path / "words.json"
    words.write_text(json.dumps({"zyzzyva": "qwxx", "hot": "cold", "up": "down"}))
    res = runner.invoke(app, ["tasks", "show", str(words), "--model", str(tiny_toy_dir), "--n-shot", "2"])
    assert res.exit_code == 1 and "'zyzzyva'" in res.stderr
