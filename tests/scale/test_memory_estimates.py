"""Memory estimates of clean and train-sae (icl_cli/core/memory.py): the formulas by hand on a tiny
configuration, the parameter count against a real model, and the estimate against a measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icl_cli.core.memory import ModelShape, clean_memory, train_sae_memory

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelShape(n_params=1000, n_layers=4, d_model=8, d_mlp=16, n_heads=2, vocab=50, dtype_bytes=2)


def test_clean_estimate_by_hand():
    e = clean_memory(TINY, d_sae=32, layer=3, P=5, n_train=2, n_heldout=3, n_val=1, n_first=2)
    caches = 6 * 5 * 8 * 2  # (2 + 3 + 1) prompts × 5 tokens × d_model 8 × 2 bytes = 480
    saved = 10 * 8 + 4 * 16 + 3 * 2 * 5  # per token and block: 80 + 64 + 30 = 174 elements
    upcast = 4 * (4 * 8 + 2 * 5)  # bfloat16: float32 copies of the norms (4·D) and softmax (H·P) = 168 bytes
    step = (2 * 5 * 1 * (saved * 2 + upcast)  # 2 prompts × 5 tokens × 1 block (3 of 4) × 516 bytes = 5160
            + 2 * 2 * 2 * 50 * (2 + 4 + 4)  # answer logits, float32 copy, log-softmax, their grads = 4000
            + 2 * 2 * 5 * 8 * 2  # block outputs and their gradients = 320
            + 4 * 32 * 4)  # θ, its gradient and Adam's moments in float32 = 512
    temp = 6 * 8 + 3 * 16 + 2 * 2 * 5  # = 116
    # the last block's output + one block's temporaries, then the answer rows: bfloat16, float32 copy, log-softmax
    score = 3 * 5 * (8 + temp) * 2 + 3 * 2 * 50 * (2 + 4 + 4)  # = 3720 + 3000
    assert e.phases == {"step": caches + step, "score": caches + score} == {"step": 10472, "score": 7200}
    assert e.resident == 1000 * 2 + ((8 + 8) * 32 + 3 * 32 + 8) * 4 == 4464
    assert (e.peak, e.phase, e.total) == (10472, "step", 4464 + 10472)


def test_train_sae_estimate_by_hand():
    e = train_sae_memory(TINY, width=32, n_dicts=2, transcoder=True, arch="topk", batch_tokens=64, buffer_batches=3,
                         ctx=16, store_bytes=4)
    p = (8 + 8) * 32 + 3 * 32 + 8  # parameters of one dictionary = 616
    dicts = 2 * 4 * p * 4  # two dictionaries: weights, gradients, two Adam moments, float32 = 19712
    buffer = 3 * 64 * 2 * (8 + 8) * 4  # 192 rows × 2 dictionaries × (d_in + d_out) × 4 bytes = 24576
    rows_tokens = 4 * 16  # min(64, 64 // 16) = 4 chunks of 16 tokens
    temp = 6 * 8 + 3 * 16 + 2 * 2 * 16  # one block without autograd at P = 16: 160 elements
    forward = 64 * temp * 2 + 3 * 64 * 2 * 16 * 2  # = 20480 + 12288
    step = 2 * 64 * (6 * 32 + 8 * 16) * 4  # top-k: 6 float32 per token and feature, 8 per d_in + d_out = 163840
    # the last block's output; 64 (< 512) scored rows of logits in bfloat16, a float32 copy and the
    # log-softmax; the encoding; one block
    evaluation = 64 * 8 * 2 + 64 * 50 * (2 + 4 + 4) + 64 * (3 * 32 + 16) * 4 + 64 * temp * 2  # 1024 + 32000 + 28672 + 20480
    assert rows_tokens == 64
    assert e.phases == {"buffer": dicts + 2 * buffer + forward, "step": dicts + buffer + step,
                        "eval": dicts + buffer + evaluation}
    assert e.phases == {"buffer": 101632, "step": 208128, "eval": 126464}
    assert e.resident == 2000 and e.phase == "step"


def test_model_shape_counts_the_parameters_of_a_real_model():
    from tests.core.tiny_models import tiny_config, tiny_model

    for family in ("gemma", "gemma2"):
        s = ModelShape.of(tiny_config(family, n_layers=3, d_model=48), 4)
        assert s.n_params == sum(p.numel() for p in tiny_model(family, n_layers=3, d_model=48).parameters())
        assert (s.n_layers, s.d_model, s.d_mlp, s.n_heads, s.vocab) == (3, 48, 96, 4, 97)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_clean_estimate_bounds_the_measured_peak():
    """One task of clean (3 steps, held-out scores, pursuit) on a random 4-layer Gemma with a 64k
    vocabulary, measured in a fresh process: the estimate is above the peak, and not wildly."""
    spec = dict(n_layers=4, d_model=128, d_mlp=512, vocab=65536, d_sae=2048, layer=2)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "benchmarks/memory_table.py", "--measure", "clean", json.dumps(spec)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nclean: estimated {r['estimate'] / 2**20:.1f} MiB, measured {r['measured'] / 2**20:.1f} MiB")
    assert r["measured"] > 10 * 2**20  # the measurement saw the logits (32 × P × 65536 floats)
    assert r["measured"] <= r["estimate"] <= 3 * r["measured"]


def test_estimate_flags_of_clean_and_train_sae(tiny_toy_dir, tmp_path):
    """`icl clean --estimate` and `icl train-sae --estimate` print the estimate and run nothing."""
    import torch
    from typer.testing import CliRunner

    from icl_cli.cli.app import app
    from icl_cli.dictionaries.base import DictConfig, build
    from icl_cli.dictionaries.io import save_saelens

    store, runner = str(tmp_path / "s"), CliRunner()
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_toy_dir).parameters())
    res = runner.invoke(app, ["--store", store, "--json", "train-sae", "--model", str(tiny_toy_dir), "--layer", "1,2",
                              "--site", "transcoder", "--width", "128", "--estimate"])
    assert res.exit_code == 0, res.stderr
    t = json.loads(res.stdout)
    assert t["n_dicts"] == 2 and t["width"] == 128 and t["layers"] == [1, 2] and t["phase"] in t["phases_gib"]
    assert t["resident_gib"] * 2**30 == n_params * 4  # float32 weights of the real model
    assert runner.invoke(app, ["--store", store, "-q", "store", "ls"]).stdout.split() == []  # nothing trained

    tv = runner.invoke(app, ["--store", store, "-q", "collect", "--model", str(tiny_toy_dir), "--tasks", "antonyms",
                             "--layers", "0-1", "--n-shot", "3", "--n-prompts", "2", "--n-eval", "4"]).stdout.strip()
    torch.manual_seed(0)
    save_saelens(build(DictConfig(d_in=32, d_sae=96, arch="gated", site="resid_pre", layer=1)), tmp_path / "sae")
    res = runner.invoke(app, ["--store", store, "--json", "clean", "--tv", tv, "--sae", str(tmp_path / "sae"),
                              "--l1", "0.05", "--estimate"])
    assert res.exit_code == 0, res.stderr
    c = json.loads(res.stdout)
    assert (c["layer"], c["d_sae"], c["n_train"], c["n_heldout"]) == (1, 96, 24, 4) and c["phase"] in ("step", "score")
    assert c["resident_gib"] * 2**30 == n_params * 4 + ((32 + 32) * 96 + 3 * 96 + 32) * 4
    listed = runner.invoke(app, ["--store", store, "-q", "store", "ls"]).stdout.split()
    assert len(listed) == 2  # the collect artifact and the imported SAE: no clean artifact, nothing trained
