"""The headline: each finding of this run beside the paper's, whether it matches, and the set-up.

Renderers put rows ``{finding, ours, paper, match, detectable?}`` in their section's
``summary["headline"]``; ``match`` is one line, "yes: …", "partly: …", "no: …" or
"no paper figure: …". A row whose measurement could not move (``detectable`` False: a loss at
its floor, every feature set empty) reads "cannot detect: …" whatever else it says, never "no":
a null that could not have been seen is not a failure to reproduce.

    setup = model_setup(["toy-icl"])   # "toy-icl: 6 layers, d_model 128, 2.0M parameters; trained on …"
    verdict(row)                       # "cannot detect: …" | row["match"]
"""

from __future__ import annotations

import json
from typing import Sequence

VERDICTS = ("yes", "partly", "no", "cannot detect", "no paper figure")


def verdict(row: dict) -> str:
    """The "matches the paper?" cell of a headline row."""
    text = str(row.get("match") or "").strip()
    if row.get("detectable") is False:
        if text.startswith("cannot detect"):
            return text
        return "cannot detect: " + (row.get("why") or "the measured quantity could not move in this run")
    return text or "not judged"


def verdict_word(text: str) -> str:
    """The verdict of a "matches the paper?" cell (its text before the colon)."""
    head = text.split(":", 1)[0].strip()
    return head if head in VERDICTS else ""


def judge(level: str, reason: str) -> str:
    """A ``match`` cell: ``level`` (one of VERDICTS) and a one-line reason."""
    if level not in VERDICTS:
        raise ValueError(f"verdict {level!r} is not one of {VERDICTS}")
    return f"{level}: {reason}"


def _count(n: int) -> str:
    """2015616 -> '2.0M', 134515008 -> '135M', 2506172416 -> '2.5B'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return str(n)


def _toy_setup() -> str | None:
    from icl_cli.core.models import TOY_DIR

    try:
        meta = json.loads((TOY_DIR / "toy_icl.json").read_text())
    except (OSError, ValueError):
        return None
    c = meta.get("config", {})
    return (f"toy-icl: {c.get('n_layers')} layers, d_model {c.get('d_model')}, {_count(int(meta.get('n_params', 0)))} "
            f"parameters; trained on every pair of the built-in tasks (0–{c.get('max_shot')}-shot prompts), so "
            "held-out queries are held out from the vectors, not unseen by the model")


def _config_setup(model: str) -> str:
    """Layers, d_model and parameter count from the model's config (no weights read); the preset's
    sizes when the config cannot be read here (offline, gated)."""
    from icl_cli.core.errors import IclError
    from icl_cli.core.models import PRESETS

    try:
        from icl_cli.core.memory import ModelShape
        from icl_cli.core.models import load_config

        shape = ModelShape.of(load_config(model), 4)
        return (f"{model}: {shape.n_layers} layers, d_model {shape.d_model}, {_count(shape.n_params)} parameters; "
                "held-out queries are pairs the vectors were not made from")
    except (IclError, OSError, ValueError, ImportError, TypeError, AttributeError):
        p = PRESETS.get(model)
        if p is not None and p.n_layers:
            return f"{model}: {p.n_layers} layers, d_model {p.d_model}"
        return model


def model_setup(models: Sequence[str]) -> str:
    """The model(s) of the run and what "held-out" means for them: one line."""
    parts = []
    for m in models:
        toy = _toy_setup() if m == "toy-icl" else None
        parts.append(toy or _config_setup(m))
    return "; ".join(parts)
