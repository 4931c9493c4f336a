"""``icl models``: the model presets.

    icl models ls
    icl --json models ls
"""

from __future__ import annotations

import typer

from icl_cli.cli.context import emit, g

app = typer.Typer(help="Model presets (any local folder or Hugging Face id works too).", no_args_is_help=True)


@app.command("ls")
def ls(ctx: typer.Context) -> None:
    """List the presets: name, Hugging Face id, family, layers, d_model."""
    from icl_cli.core.models import preset_rows  # no torch: reads only the preset table

    rows = preset_rows()

    def table():
        from rich.table import Table

        t = Table(title="model presets")
        for col in ("name", "HF id", "family", "layers", "d_model", "notes"):
            t.add_column(col, justify="right" if col in ("layers", "d_model") else "left", no_wrap=col != "notes")
        for r in rows:
            dash = lambda v: "-" if v is None else str(v)  # noqa: E731
            t.add_row(r["name"], r["hf_id"], r["family"], dash(r["n_layers"]), dash(r["d_model"]), r["notes"])
        return t

    emit(g(ctx), data=rows, table=table, keys=[r["name"] for r in rows])
