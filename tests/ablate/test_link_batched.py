"""The link's shared parts: the executors' narrow encoder, the ablation estimand batched over
detectors against one plain HF forward per detector, and the artifact of both estimands."""

from __future__ import annotations

import pytest
import torch

from icl_cli.ablate.feature_ablation import AblateParams, few_shot_prompts
from icl_cli.ablate.link import feature_encoder, read_h5, run_link, summary_json, write_h5
from icl_cli.core.batch import encode_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import load_task
from icl_cli.dictionaries.base import DictConfig, build

P = AblateParams(n_shot=3, n_eval=4, seed=0)


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu", "topk"])
def test_feature_encoder_equals_the_full_encoding_at_those_features(arch):
    torch.manual_seed(0)
    sae = build(DictConfig(d_in=16, d_sae=40, arch=arch, k=6 if arch == "topk" else 0)).requires_grad_(False)
    with torch.no_grad():
        for p in sae.parameters():
            if p.dim() == 1:
                p.uniform_(-0.3, 0.3)
    x = torch.randn(3, 5, 16)
    ids = [39, 0, 17, 5]
    full = sae.encode(x)
    assert (full[..., ids] > 0).any()
    torch.testing.assert_close(feature_encoder(sae, ids)(x), full[..., ids], rtol=1e-6, atol=1e-6)


def _standard_sae(d_in, d_sae, layer, seed):
    torch.manual_seed(seed)
    sae = build(DictConfig(d_in=d_in, d_sae=d_sae, arch="standard", site="resid_pre", layer=layer)).requires_grad_(False)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.05, 0.3)
        sae.b_dec.normal_(0, 0.5)
    return sae


@pytest.mark.parametrize("removal", ["project", "feature", "steer"])
def test_ablation_estimand_batched_equals_one_plain_forward_per_detector(tiny_lm, removal):
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    hm = HookedModel(model)
    ld, le = 0, 2
    det, exe = _standard_sae(32, 12, ld, 1), _standard_sae(32, 12, le, 2)
    dets, exes, s = [1, 4, 6, 9, 10], [0, 3, 7], 4.0
    task = load_task("antonyms")
    batch = encode_prompts(tok, few_shot_prompts(task, P))
    arrows, outputs = batch.role_mask("arrow"), batch.role_mask("output")

    def by_hand(d):
        w = det.W_dec[d]
        u = w / w.norm()

        def pre(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if removal == "project":
                delta = -(x @ u)[..., None] * u
            elif removal == "feature":
                delta = -torch.relu((x - det.b_dec) @ det.W_enc[:, d] + det.b_enc[d])[..., None] * w
            else:
                delta = -s * u.expand_as(x)
            x = x + outputs[..., None] * delta
            return (args, {**kwargs, "hidden_states": x}) if "hidden_states" in kwargs else ((x, *args[1:]), kwargs)

        seen = {}
        h1 = model.model.layers[ld].register_forward_pre_hook(pre, with_kwargs=True)
        h2 = model.model.layers[le - 1].register_forward_hook(lambda m, a, o: seen.setdefault("y", o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        finally:
            h1.remove(), h2.remove()
        a = torch.relu((seen["y"] - exe.b_dec) @ exe.W_enc[:, exes] + exe.b_enc[exes])
        return (a * arrows[..., None]).sum((0, 1))

    expect = torch.stack([by_hand(d) for d in dets])  # [D, E]
    assert expect.abs().sum() > 0
    for n in (1, 2, None):
        r = run_link(hm, tok, [task], det, dets, exe, exes, P, removal=removal, scale=s, detectors_per_pass=n)
        torch.testing.assert_close(r.after[:, 0], expect, rtol=1e-4, atol=1e-4)


def test_both_estimands_round_trip_through_link_h5(tmp_path, tiny_lm):
    import h5py

    from icl_cli.ablate.link_frozen import run_frozen_link
    from icl_cli.ablate.link_frozen import write_h5 as write_frozen

    hm = HookedModel(tiny_lm.model)
    det, exe = _standard_sae(32, 12, 1, 3), _standard_sae(32, 12, 2, 4)
    tasks = [load_task("antonyms"), load_task("en_es")]
    r = run_frozen_link(hm, tiny_lm.tokenizer, tasks, det, [1, 2], exe, [3, 5], P, own_pairs=[(1, 3)],
                        executor_tasks={3: ["antonyms"], 5: ["en_es"]}, detector_tasks={1: ["antonyms"], 2: ["en_es"]})
    with h5py.File(tmp_path / "f.h5", "w") as f:
        write_frozen(f, r)
    back, attrs = read_h5(tmp_path / "f.h5")
    assert attrs["estimand"] == "frozen-attention" and back.layers == (1, 2)
    for k in ("cell_count", "cell_sum", "cell_half", "pair_median", "own", "weights", "group_hist", "mean_act"):
        assert torch.equal(torch.nan_to_num(getattr(back, k)), torch.nan_to_num(getattr(r, k))), k
    doc = summary_json("k" * 64, back, attrs)
    assert doc["estimand"] == "frozen-attention" and doc["detector_labels"] == ["1 (antonyms)", "2 (en_es)"]
    assert doc["own_pairs"]["pairs"] == 1 and doc["task_matrix"]["detector_tasks"] == ["antonyms", "en_es"]
    assert doc["own_pairs"]["positions"] == int(r.pair_count[0, 0])

    a = run_link(hm, tiny_lm.tokenizer, tasks, det, [1, 2], exe, [3, 5], P)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        write_h5(f, a, "project", 1.0, (1, 2))
    back, attrs = read_h5(tmp_path / "a.h5")
    assert attrs["estimand"] == "ablation" and torch.equal(back.after, a.after)
    assert summary_json("k" * 64, back, attrs)["estimand"] == "ablation"
