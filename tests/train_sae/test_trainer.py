"""The trainer on a tiny random model: learning, resume after kill -9, NaN, data and input errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from sae_helpers import tiny_lm  # noqa: E402

from icl_cli.core.errors import IclError  # noqa: E402
from icl_cli.train_sae import checkpoint as ckpt  # noqa: E402
from icl_cli.train_sae.config import TrainConfig  # noqa: E402
from icl_cli.train_sae.trainer import train_dictionaries  # noqa: E402

HERE = Path(__file__).parent
SMALL = dict(model="tiny", dataset="tasks", width=128, batch_tokens=256, ctx=32, buffer_batches=4, eval_tokens=512, lr=3e-3)


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return tiny_lm()


@pytest.mark.parametrize("arch,site", [("gated", "resid"), ("topk", "attn"), ("jumprelu", "transcoder"), ("standard", "resid")])
def test_training_learns_and_reports_metrics(lm, arch, site):
    res = train_dictionaries(TrainConfig(layers=[0, 1], arch=arch, site=site, k=8, tokens=60 * 256, **SMALL), lm)
    assert [r.layer for r in res] == [0, 1]
    for r in res:
        m = r.metrics
        assert set(m) >= {"l0", "fvu", "dead_fraction", "ce_recovered", "ce_clean", "ce_zero"}
        assert 0 < m["l0"] < 128 and 0 <= m["dead_fraction"] <= 1
        fvu = r.curves["fvu"]
        assert fvu[-1] < fvu[0]
        assert m["fvu"] < (0.9 if site != "transcoder" else 0.7 * fvu[0]), m  # learned, on held-out tokens
        assert r.sparsity.shape == (128,)
        assert r.sae.cfg.layer == r.layer and r.sae.cfg.site == {"resid": "resid_pre", "attn": "attn_out"}.get(site, "transcoder")
        if arch == "topk":
            assert m["l0"] <= 8


def test_dead_features_are_resampled_and_counted(lm):
    # a huge L1 kills most features early: resampling must revive (and count) them
    res = train_dictionaries(TrainConfig(layers=[0], arch="standard", l1=200.0, tokens=50 * 256, **{**SMALL, "lr": 3e-2}), lm)
    assert res[0].metrics["resampled"] > 0


def test_resume_after_kill_9_gives_same_weights(tmp_path):
    from resume_worker import run

    ref = run(tmp_path / "ref", resume=False, slow=False)
    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(HERE / "resume_worker.py"), str(work)],
                            env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)})
    deadline = time.time() + 300  # a loaded machine starts the worker slowly; a fast one waits only ~1 s
    while time.time() < deadline and (ckpt.step_of(work) or 0) < 10:
        time.sleep(0.02)
    assert proc.poll() is None, "the worker finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = ckpt.step_of(work)
    assert step is not None and 10 <= step < 48
    res = run(work, resume=True, slow=False)
    for a, b in zip(ref, res):
        for (name, p), q in zip(a.sae.state_dict().items(), b.sae.state_dict().values()):
            assert torch.equal(p, q), name
        assert a.metrics["fvu"] == b.metrics["fvu"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(lm, tmp_path, monkeypatch):
    from icl_cli.dictionaries.standard import StandardSAE

    real, calls = StandardSAE.training_loss, []

    def poisoned(self, x, target, coeff, dead=None):  # the loss turns NaN at step 7
        calls.append(1)
        parts = real(self, x, target, coeff, dead)
        return parts._replace(loss=parts.loss * float("nan")) if len(calls) == 8 else parts

    monkeypatch.setattr(StandardSAE, "training_loss", poisoned)
    cfg = TrainConfig(layers=[0], arch="standard", tokens=30 * 256, checkpoint_every=1, **SMALL)
    with pytest.raises(IclError, match="NaN at step 7") as err:
        train_dictionaries(cfg, lm, work_dir=tmp_path)
    kept = ckpt.step_of(tmp_path)
    assert kept == 6 and "step 6" in str(err.value) and "\n" not in str(err.value)
    tensors, _ = ckpt.load(tmp_path)
    assert all(torch.isfinite(v.float()).all() for k, v in tensors.items() if k.startswith("sae0."))


def test_local_jsonl_and_txt_datasets(lm, tmp_path):
    import json

    words = "Follow the pattern:\nhot -> cold\nbig -> small\n"
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": words * 3}) for _ in range(200)))
    res = train_dictionaries(TrainConfig(layers=[1], arch="topk", k=4, tokens=10 * 256, **{**SMALL, "dataset": str(tmp_path / "d.jsonl")}), lm)
    assert res[0].metrics["eval_tokens"] > 0
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(IclError, match="no tokens"):
        train_dictionaries(TrainConfig(layers=[0], tokens=256, **{**SMALL, "dataset": str(tmp_path / "empty.txt")}), lm)
    with pytest.raises(IclError, match="does not exist"):
        train_dictionaries(TrainConfig(layers=[0], tokens=256, **{**SMALL, "dataset": str(tmp_path / "nope.txt")}), lm)


def test_bad_inputs(lm):
    with pytest.raises(IclError, match="out of range"):
        train_dictionaries(TrainConfig(layers=[5], tokens=256, **SMALL), lm)
    with pytest.raises(IclError, match="width"):
        TrainConfig(layers=[0], width=0)
    with pytest.raises(IclError, match="site"):
        TrainConfig(layers=[0], site="mlp")
    with pytest.raises(IclError, match="architecture"):
        train_dictionaries(TrainConfig(layers=[0], arch="relu", tokens=256, **SMALL), lm)


def test_hf_dataset_offline_is_one_line_error(lm, monkeypatch):
    import icl_cli.core.hub as hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(IclError, match="unreachable") as err:
        train_dictionaries(TrainConfig(layers=[0], tokens=256, **{**SMALL, "dataset": "HuggingFaceFW/fineweb"}), lm)
    assert "\n" not in str(err.value)
