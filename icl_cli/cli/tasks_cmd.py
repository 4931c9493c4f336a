"""``icl tasks``: list the task suite and show a prompt with its token roles.

    icl tasks ls [--tasks-dir DIR]
    icl tasks show antonyms --n-shot 3
    icl --json tasks show my_task.json --model gemma-1-2b --template todd
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from icl_cli.cli.context import emit, g

app = typer.Typer(help="The task suite: list tasks, show prompts with token roles.", no_args_is_help=True)

ROLE_STYLE = {"prompt": "magenta", "input": "bold cyan", "arrow": "bold yellow", "output": "bold green", "newline": "dim"}


@app.command("ls")
def ls_cmd(
    ctx: typer.Context,
    tasks_dir: Optional[Path] = typer.Option(None, "--tasks-dir", help="A folder of task JSON files to use instead of the built-in suite."),
) -> None:
    """List tasks: name, group, number of pairs, source file."""
    from icl_cli.core.tasks import builtin_tasks, suite_from_dir

    suite = suite_from_dir(tasks_dir) if tasks_dir else builtin_tasks()
    rows = [{"name": t.name, "group": t.group, "size": len(t), "source": t.source} for t in suite.values()]

    def table():
        from rich.table import Table

        tab = Table(title=f"{len(rows)} tasks")
        for col in ("name", "group", "size", "source"):
            tab.add_column(col, justify="right" if col == "size" else "left")
        for r in rows:
            tab.add_row(r["name"], r["group"], str(r["size"]), _short(r["source"]))
        return tab

    emit(g(ctx), rows, table=table, keys=[r["name"] for r in rows])


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task name or path to a task JSON file."),
    model: str = typer.Option("toy-icl", "--model", help="Model whose tokenizer splits the prompt."),
    n_shot: int = typer.Option(3, "--n-shot", help="Examples before the query."),
    template: str = typer.Option("paper", "--template", help="paper | hendel | todd."),
    tasks_dir: Optional[Path] = typer.Option(None, "--tasks-dir", help="Folder of task files to look the name up in."),
    answer: bool = typer.Option(True, "--answer/--no-answer", help="Append the query's answer."),
) -> None:
    """Show one prompt with every token coloured by its role."""
    from icl_cli.core.batch import encode_prompts
    from icl_cli.core.models import load_tokenizer
    from icl_cli.core.prompts import ROLES, sample_prompts
    from icl_cli.core.tasks import load_task

    gl = g(ctx)
    t = load_task(task, tasks_dir)
    prompt = sample_prompts(t.pairs, 1, n_shot, gl.seed, template, with_answer=answer, task_name=t.name)[0]
    tokenizer = load_tokenizer(model, trust_remote_code=gl.trust_remote_code)
    batch = encode_prompts(tokenizer, [prompt])
    ids = batch.input_ids[0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    roles = [ROLES[c - 1] if c else None for c in batch.roles[0].tolist()]
    data = {"task": t.name, "template": template, "n_shot": n_shot, "text": prompt.text,
            "tokens": tokens, "ids": ids, "roles": roles}

    def render():
        from rich.text import Text

        out = Text()
        for tok, role in zip(tokens, roles):
            shown = tok.replace("\n", "\\n").replace("▁", " ")
            out.append(shown, style=ROLE_STYLE.get(role, "") if role else "")
            out.append("│", style="dim")
        legend = Text("  ".join(f"{r}" for r in ROLE_STYLE), style="dim")
        for r, style in ROLE_STYLE.items():
            legend.highlight_words([r], style)
        return [out, legend]

    emit(gl, data, table=render, keys=[t.name])


def _short(source: str) -> str:
    p = Path(source)
    return p.name if p.is_absolute() and "icl_cli" in p.parts else source
