"""A layer's SAE depends only on its key: trained alone or among other layers, it is the same.

The key of a train-sae artifact hashes one layer's settings, not which layers trained together;
so the weights (initialisation, resampling of dead features, data order) must not depend on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from sae_helpers import tiny_lm  # noqa: E402

from icl_cli.train_sae.config import TrainConfig  # noqa: E402
from icl_cli.train_sae.trainer import train_dictionaries  # noqa: E402

# l1 high and lr high so that features die and the 20/40/60% resampling really runs
SMALL = dict(model="tiny", dataset="tasks", width=256, batch_tokens=128, ctx=32, buffer_batches=4, eval_tokens=256,
             lr=3e-2, tokens=50 * 128)


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return tiny_lm(n_layers=3)


@pytest.mark.parametrize("arch,site,l1", [("standard", "resid", 200.0), ("topk", "transcoder", None)])
def test_layer_alone_equals_layer_among_others(lm, arch, site, l1):
    extra = {"l1": l1} if l1 is not None else {"k": 4}
    alone = train_dictionaries(TrainConfig(layers=[1], arch=arch, site=site, **extra, **SMALL), lm)
    group = train_dictionaries(TrainConfig(layers=[0, 1, 2], arch=arch, site=site, **extra, **SMALL), lm)
    a, b = alone[0], group[1]
    assert a.layer == b.layer == 1
    if arch == "standard":
        assert a.metrics["resampled"] > 0  # the resampling path was exercised
    sa, sb = a.sae.state_dict(), b.sae.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.metrics["fvu"] == b.metrics["fvu"] and a.metrics["l0"] == b.metrics["l0"]
    # and the layers of a group really differ from each other (not one init copied around)
    assert not torch.equal(group[0].sae.W_dec, group[1].sae.W_dec)


def test_other_seed_or_site_gives_other_initial_weights():
    from icl_cli.train_sae.trainer import init_generator

    def draw(*a):
        return torch.randn(4, generator=init_generator(*a))

    assert torch.equal(draw(0, "resid", 3), draw(0, "resid", 3))
    assert not torch.equal(draw(0, "resid", 3), draw(1, "resid", 3))
    assert not torch.equal(draw(0, "resid", 3), draw(0, "attn", 3))
    assert not torch.equal(draw(0, "resid", 3), draw(0, "resid", 4))
