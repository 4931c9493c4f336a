"""Fixtures shared across the suite: a tiny random Gemma that speaks the toy model's vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ICL_THREADS", "1")  # icl commands run in-process and in subprocesses: one thread each


@pytest.fixture(scope="session")
def tiny_toy_dir(tmp_path_factory) -> Path:
    """A 3-layer, d_model 32 random Gemma folder with the toy tokenizer (built-in task vocabulary)."""
    import torch

    from icl_cli.core.tasks import builtin_tasks
    from icl_cli.zoo.toy_icl import ToyConfig, build_model, build_tokenizer

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_toy")
    tok = build_tokenizer(builtin_tasks())
    model = build_model(ToyConfig(n_layers=3, d_model=32, n_heads=2, d_mlp=64, seed=0), tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tiny_toy_dir):
    from icl_cli.core.models import load_model

    return load_model(str(tiny_toy_dir), device="cpu")
