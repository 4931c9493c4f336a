"""SPEC §4: which pairs build the task vectors and which are scored, and the best layer."""

from __future__ import annotations

import dataclasses

import torch

import icl_cli.collect.vectors as collect_mod
from icl_cli.collect.vectors import CollectParams, collect_task, task_split
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import load_task
from tests.formulas._reference import hidden_states, logits_with_added, pad, summed_nll, word_tokens


def test_vectors_use_train_pairs_only_and_the_sweep_scores_held_out_queries(tiny_lm, monkeypatch):
    hm = HookedModel(tiny_lm.model)
    # 16 pairs, 4 held out; 16 prompts: their queries cycle through every pair they may use
    task = dataclasses.replace(load_task("en_fr"), pairs=load_task("en_fr").pairs[:16])
    p = CollectParams(n_shot=4, n_prompts=16, n_eval=5)
    seen: dict[str, list] = {"mean": [], "cache": []}
    real_mean, real_build = collect_mod.mean_at_role, collect_mod.BaseCache.build

    def mean_spy(hm_, tok, prompts, *a, **k):
        seen["mean"] += list(prompts)
        return real_mean(hm_, tok, prompts, *a, **k)

    def build_spy(hm_, tok, prompts, *a, **k):
        seen["cache"] += list(prompts)
        return real_build(hm_, tok, prompts, *a, **k)

    monkeypatch.setattr(collect_mod, "mean_at_role", mean_spy)
    monkeypatch.setattr(collect_mod.BaseCache, "build", build_spy)
    r = collect_task(hm, tiny_lm.tokenizer, task, [0, 2], p)
    train, held = task_split(task, p.n_eval, p.seed)
    assert len(held) == 4
    assert len(seen["mean"]) == p.n_prompts
    for prompt in seen["mean"]:
        assert len(prompt.examples) == p.n_shot
        assert all(pair in train for pair in prompt.pairs)  # no held-out pair builds a vector
    assert seen["cache"] and {q.query for q in seen["cache"]} <= set(held)
    assert all(not q.examples for q in seen["cache"])  # the sweep steers 0-shot prompts
    assert sorted(r.heldout) == sorted(x for x, _ in held)

    # TV[l] = mean of resid_pre[l] over every arrow token of those prompts (HF hidden states)
    # DV[l]: the same over every output token (toy words are single tokens: the one after "->")
    rows = [tiny_lm.tokenizer(q.text)["input_ids"] for q in seen["mean"]]
    arrows = []
    for q in seen["mean"]:
        toks = word_tokens(tiny_lm.tokenizer, q.text)
        arrows.append([i for i, t in enumerate(toks) if t == "->"])
    for j, layer in enumerate([0, 2]):
        vecs, outs = [], []
        for ids, arr in zip(rows, arrows):
            t = torch.tensor([ids])
            hs = hidden_states(tiny_lm.model, t, torch.ones_like(t))[layer][0]
            vecs += [hs[i] for i in arr]
            outs += [hs[i + 1] for i in arr]
        torch.testing.assert_close(r.tv[j], torch.stack(vecs).mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(r.dv[j], torch.stack(outs).mean(0), atol=1e-5, rtol=1e-4)

    # the TV sweep loss at each layer: the vector added at the query arrow of the 0-shot prompts
    zero = seen["cache"]
    ids, mask = pad([tiny_lm.tokenizer(q.text)["input_ids"] for q in zero], tiny_lm.tokenizer.pad_token_id)
    where, targets = [], []
    for b, q in enumerate(zero):
        arrow = max(i for i, t in enumerate(word_tokens(tiny_lm.tokenizer, q.text)) if t == "->")
        where.append(arrow)
        targets.append([(arrow, int(ids[b, arrow + 1]))])
    for j, layer in enumerate([0, 2]):
        with torch.no_grad():
            want = summed_nll(logits_with_added(tiny_lm.model, ids, mask, layer, r.tv[j], where), targets)
        assert abs(r.sweep["tv_nll"][j] - float(want)) < 1e-4 * max(1.0, float(want))
    assert r.best_layer == [0, 2][min(range(2), key=lambda j: r.sweep["tv_nll"][j])]
