"""train_suite: every kind of dictionary at every layer trained on one forward pass per batch, each
one the same as when its site trains alone (its weights depend only on its own settings)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train_sae"))
from sae_helpers import tiny_lm  # noqa: E402

from icl_cli.core.sites import HookedModel  # noqa: E402
from icl_cli.dictionaries.suite import KINDS  # noqa: E402
from icl_cli.dictionaries.suite_build import write_suite  # noqa: E402
from icl_cli.train_sae.suite import train_suite  # noqa: E402
from icl_cli.train_sae.config import TrainConfig  # noqa: E402
from icl_cli.train_sae.trainer import train_dictionaries  # noqa: E402

SMALL = dict(model="tiny", dataset="tasks", arch="topk", k=4, width=64, batch_tokens=128, ctx=32, buffer_batches=2,
             eval_tokens=128, lr=1e-2, tokens=6 * 128)


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return tiny_lm(n_layers=3)


def test_one_pass_trains_every_kind_as_if_alone(lm, monkeypatch):
    stops = []
    run = HookedModel.run

    def counting(self, *a, **k):
        stops.append(k.get("stop_after"))
        return run(self, *a, **k)

    monkeypatch.setattr(HookedModel, "run", counting)
    members = train_suite(lm, TrainConfig(layers=[0, 1], **SMALL))
    assert [(kind, layer) for kind, layer, _ in members] == [(k, l) for k in KINDS for l in (0, 1)]
    # harvest passes stop after block 1, the highest layer; evaluation's run to the last block (2)
    suite_harvest = stops.count(1)
    assert suite_harvest >= 6 and set(stops) == {1, 2}

    stops.clear()
    for kind in KINDS:
        alone = train_dictionaries(TrainConfig(layers=[0, 1], site=kind, **SMALL), lm)
        for r in alone:
            (got,) = [t for k, l, t in members if (k, l) == (kind, r.layer)]
            assert got.site == kind and got.sae.cfg.site == r.sae.cfg.site
            for name, want in r.sae.state_dict().items():
                assert torch.equal(got.sae.state_dict()[name], want), (kind, r.layer, name)
            assert got.metrics["fvu"] == pytest.approx(r.metrics["fvu"], rel=1e-5)
            assert got.metrics["ce_recovered"] == pytest.approx(r.metrics["ce_recovered"], rel=1e-4, abs=1e-6)
    # the three sites trained one at a time made three times the suite's harvest passes
    assert stops.count(1) == 3 * suite_harvest


def test_write_suite_takes_trained_dictionaries(lm, tmp_path):
    from icl_cli.dictionaries.suite import load_suite

    members = train_suite(lm, TrainConfig(layers=[2], **SMALL))
    m = write_suite(tmp_path / "s", members, lm, name="tiny-suite", training={"tokens": SMALL["tokens"]},
                    check={"task": "antonyms", "n_prompts": 2, "n_shot": 3, "seed": 0})
    assert [(e["kind"], e["layer"], e["source_key"]) for e in m["dictionaries"]] == [(k, 2, None) for k in KINDS]
    suite = load_suite(str(tmp_path / "s"))
    for kind, layer, t in members:
        e = next(e for e in m["dictionaries"] if e["kind"] == kind)
        assert e["l0"] == t.metrics["l0"] and e["ce_recovered"] == t.metrics["ce_recovered"]
        # the stored float16 weights are the trained ones, rounded
        torch.testing.assert_close(suite[(kind, layer)].W_dec, t.sae.W_dec.half().float(), rtol=0, atol=0)
