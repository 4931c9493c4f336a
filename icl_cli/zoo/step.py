"""The zoo steps as one call each (``icl zoo train``, ``icl zoo eval``): train the bundled toy model,
measure its targets, and record them in its ``toy_icl.json``.

    folder, meta = train_toy(env, ToyTrainRequest(steps=300, out=Path("toy")))
    result = evaluate_toy(env, Path("toy"), write=True)
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional

from icl_cli.core.errors import IclError
from icl_cli.core.runenv import RunEnv


def check_name(name: str) -> None:
    if name != "toy-icl":
        raise IclError(f"unknown zoo model {name!r}; the zoo has: toy-icl")


@dataclass
class ToyTrainRequest:
    """The options of ``icl zoo train toy-icl``."""

    out: Optional[Path] = None
    """Output folder (default: the bundled folder inside the package)."""
    steps: Optional[int] = None
    """Optimiser steps (default: the recipe's)."""
    evaluate_after: bool = True
    """Measure the targets after training."""
    resume: bool = False
    """Continue an interrupted run from its last checkpoint."""
    threads: Optional[int] = None
    """CPU threads (default 1, as the bundled weights)."""


def toy_config(env: RunEnv, req: ToyTrainRequest):
    """The ToyConfig of a request (seeded from the environment)."""
    from icl_cli.zoo.toy_icl import ToyConfig

    cfg = ToyConfig(seed=env.seed)
    if req.steps is not None:
        cfg.steps = req.steps
    if req.threads is not None:
        if req.threads < 1:
            raise IclError("--threads must be ≥ 1")
        cfg.threads = req.threads
    return cfg


def train_toy(env: RunEnv, req: ToyTrainRequest,
              progress: Callable[[int], ContextManager[Callable[[int, int, float], None]]] | None = None) -> tuple[Path, dict]:
    """(folder, its metadata) after training the toy model (deterministic on CPU for a fixed seed),
    then measuring it (``evaluate_after``). ``progress(steps)`` opens the training's progress
    display, which is called with (step, steps, loss)."""
    from icl_cli.zoo.toy_icl import TOY_DIR, train

    cfg = toy_config(env, req)
    out_dir = req.out or TOY_DIR
    with (progress(cfg.steps) if progress is not None else contextlib.nullcontext()) as on_step:
        meta = train(cfg, out_dir, progress=on_step, resume=req.resume)
    if req.evaluate_after:
        meta["eval"] = evaluate_toy(env, out_dir)
        (out_dir / "toy_icl.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir, meta


def evaluate_toy(env: RunEnv, model_dir: Path, write: bool = False) -> dict:
    """Accuracy by shots, 0-shot accuracy on shared-input tasks and task-vector gap closing of the
    model in ``model_dir``; with ``write``, also stored in its toy_icl.json."""
    from icl_cli.core.tasks import builtin_tasks
    from icl_cli.zoo.toy_eval import evaluate

    lm = env.load_lm(str(model_dir))
    result = evaluate(lm.model, lm.tokenizer, list(builtin_tasks().values()), seed=env.seed + 1,
                      progress=lambda t: env.log(f"evaluating {t}"))
    if write:
        meta_path = model_dir / "toy_icl.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta["eval"] = result
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return result
