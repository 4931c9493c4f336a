"""Run in a fresh interpreter (malloc returns freed memory at once): print the estimated and the
measured peak working memory of a circuit's phases as JSON. argv: toy | gemma2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from icl_cli.circuit.attribution import node_scores  # noqa: E402
from icl_cli.circuit.edges import edges  # noqa: E402
from icl_cli.circuit.estimate import Shapes, estimate, measure_peak  # noqa: E402
from icl_cli.circuit.faithfulness import Ranking, ablated_metric  # noqa: E402
from icl_cli.core.batch import PromptBatch  # noqa: E402
from icl_cli.core.sites import HookedModel  # noqa: E402
from tests.circuit.helpers import tiny_suite, toy_batch  # noqa: E402


def main(which: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if which == "toy":
        from icl_cli.core.models import load_model

        lm = load_model("toy-icl", device="cpu")
        model, batch = lm.model, toy_batch(lm, n_prompts=4, n_shot=12)
        dicts = tiny_suite(lm.d_model, range(lm.n_layers), d_sae=512)
    else:
        from tests.core.tiny_models import tiny_model

        model = tiny_model("gemma2", n_layers=3, d_model=48)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 97, (8, 60), generator=g)
        roles = torch.randint(1, 6, (8, 60), generator=g).to(torch.int8)
        pos = torch.arange(3, 59, 6).repeat(8, 1)
        batch = PromptBatch(ids, torch.ones_like(ids), roles, torch.full((8,), 58), pos[:, :2], ids[:, 1:3], pos,
                            ids.gather(1, pos + 1))
        dicts = tiny_suite(48, range(3), d_sae=384)
    hm = HookedModel(model)
    measured = {}
    measured["clean"] = measure_peak(lambda: node_scores(hm, batch, dicts), "cpu")
    measured["ig"] = measure_peak(lambda: node_scores(hm, batch, dicts, "ig", ig_steps=4, max_rows=128), "cpu")
    s = node_scores(hm, batch, dicts)
    r = Ranking.of(s.ie)
    measured["sweep"] = measure_peak(lambda: ablated_metric(hm, batch, dicts, s.groups, s.base, r.mask(0, True)), "cpu")
    sel: dict = {}
    for i in range(300):
        sel.setdefault(r.keys[int(r.key_idx[i])], []).append((int(r.group[i]), int(r.feature[i])))
    measured["edges"] = measure_peak(lambda: edges(hm, batch, dicts, s, sel, max_rows=128), "cpu")
    est = estimate(Shapes.of(model.config, dicts, 4), len(batch), batch.input_ids.shape[1], "ig", 4, 128)
    print(json.dumps({"measured": measured, "estimated": est.phases, "peak": est.peak}))


if __name__ == "__main__":
    main(sys.argv[1])
