"""What a fresh clone's reader sees: the method reference is in the repository, nothing points
outside it, and every command the README names exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "DESIGN.md", ROOT / "docs" / "METHODS.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_point_inside_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    assert "../shared" not in text and "SPEC.md" not in text and "STYLE.md" not in text


def test_methods_reference_covers_the_pipeline():
    text = (ROOT / "docs" / "METHODS.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (\d+)\. (.+)$", text, flags=re.M)
    assert [int(n) for n, _ in headings] == list(range(1, 11))  # docstrings cite §1-§10
    for needle in ("resid_pre", "arrow", "all_pairs_logprob", "task vector", "--l1 auto", "gradient pursuit",
                   "executor", "faithfulness", "SAELens", "every pair of every built-in task", "**Paper:**", "**Here:**"):
        assert needle in text, needle
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/METHODS.md" in readme
    assert "every pair of every task" in readme and "held out\nfrom building the task vectors" in readme


def _help_texts():
    """--help of the app and of every command and subcommand, as users see it."""
    import typer
    from typer.testing import CliRunner

    from icl_cli.cli.app import app

    runner = CliRunner()
    group = typer.main.get_command(app)
    todo = [([], group)]
    while todo:
        path, cmd = todo.pop()
        yield " ".join(path) or "icl", runner.invoke(app, [*path, "--help"]).stdout
        for name, sub in getattr(cmd, "commands", {}).items():
            todo.append(([*path, name], sub))


def test_help_texts_point_inside_the_repository():
    seen = 0
    for name, text in _help_texts():
        seen += 1
        assert "SPEC" not in text and "../shared" not in text, name
    assert seen > 10


FLAGS = {"--json", "-q", "--quiet", "-v", "--verbose", "--trust-remote-code"}
VALUED = {"--store", "--device", "--dtype", "--device-map", "--seed"}


def _named_commands(text: str) -> set[str]:
    """The subcommand of every `icl ...` command line in the text (after global options)."""
    named = set()
    for m in re.finditer(r"(?<![\w/.-])icl ([^`\n|]*)", text):
        words = re.sub(r"\[[^\]]*\]", " ", m.group(1)).split()
        i = 0
        while i < len(words) and (words[i] in FLAGS or words[i] in VALUED or words[i] == "..."):
            i += 2 if words[i] in VALUED else 1
        if i < len(words) and re.fullmatch(r"[a-z][a-z-]*", words[i]):
            named.add(words[i])
    return named


def test_every_command_the_readme_names_exists():
    import typer

    from icl_cli.cli.app import app

    commands = set(typer.main.get_command(app).commands)
    named = _named_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    named -= {"ready", "turns", "makes"}  # prose: "icl ready", "`icl` turns ..."
    assert {"collect", "clean", "train-sae", "store", "zoo"} <= named
    assert named <= commands, f"the README names commands that do not exist: {sorted(named - commands)}"
    assert _named_commands("`icl -q --store x steer --clean K` and icl [--json] circuit") == {"steer", "circuit"}
