"""Measure the toy model's targets (issue: the bundled toy ICL model).

1. First-answer-token accuracy per task at 0, 1, 4 and 16 shots on fresh prompts (paper template).
2. 0-shot accuracy on the tasks at least half of whose inputs are inputs of another task too
   (should be ≤ 0.5: the task can only be inferred from the examples).
3. Task vectors: TV[t, l] = mean resid_pre[l] over the arrows of 16-shot prompts built from the
   task's train pairs, added at the arrow of 0-shot prompts whose queries are held out. Gap closed
   = (acc_TV − acc_0) / (acc_16 − acc_0), from the accuracies averaged over tasks, at the single
   best layer (the headline) and with each task at its own best layer (optimistic: chosen on the
   same prompts).
"""

from __future__ import annotations

from typing import Callable

import torch

from icl_cli.core.batch import encode_prompts
from icl_cli.core.metrics import correct
from icl_cli.core.prompts import sample_prompts, split_pairs
from icl_cli.core.sites import HookedModel, Site, add_at
from icl_cli.core.tasks import Task

SHOTS = (0, 1, 4, 16)


def shared_input_tasks(tasks: list[Task], min_fraction: float = 0.5) -> list[str]:
    """Tasks at least ``min_fraction`` of whose inputs are also inputs of another task (for the
    rest, e.g. es_en, the input word alone gives the task away)."""
    inputs = {t.name: {x for x, _ in t.pairs} for t in tasks}
    shared = []
    for n, xs in inputs.items():
        others = set().union(*(ys for m, ys in inputs.items() if m != n))
        if len(xs & others) >= min_fraction * len(xs):
            shared.append(n)
    return shared


@torch.no_grad()
def _accuracy(hm: HookedModel, tokenizer, prompts, edit_vec=None, layer=None) -> float:
    batch = encode_prompts(tokenizer, prompts)
    edit = {}
    if edit_vec is not None:
        edit = {Site("resid_pre", layer): add_at(edit_vec, batch.zero_shot_arrow_mask())}
    out = hm.run(batch.input_ids, batch.attention_mask, edit=edit)
    return correct(out.logits, batch).float().mean().item()


@torch.no_grad()
def task_vectors(hm: HookedModel, tokenizer, pairs, n_prompts: int, n_shot: int, seed: int, name: str) -> torch.Tensor:
    """[n_layers, d_model]: mean resid_pre[l] over every arrow of ``n_prompts`` few-shot prompts."""
    prompts = sample_prompts(pairs, n_prompts, n_shot, seed, with_answer=False, task_name=name)
    batch = encode_prompts(tokenizer, prompts)
    sites = [Site("resid_pre", l) for l in range(hm.n_layers)]
    out = hm.run(batch.input_ids, batch.attention_mask, read=sites)
    mask = batch.role_mask("arrow")
    return torch.stack([out.acts[s][mask].float().mean(0) for s in sites])


def evaluate(
    model, tokenizer, tasks: list[Task], n_eval: int = 48, seed: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict:
    hm = HookedModel(model)
    per_task: dict[str, dict] = {}
    for task in tasks:
        if progress:
            progress(task.name)
        res = {f"acc_{k}shot": _accuracy(hm, tokenizer, sample_prompts(task.pairs, n_eval, k, seed + k, task_name=task.name))
               for k in SHOTS}
        # task vectors from train pairs only; their 0-shot test queries are held out
        train, heldout = split_pairs(task.pairs, n_eval, seed)
        tv = task_vectors(hm, tokenizer, train, 16, 16, seed + 100, task.name)
        zero = sample_prompts(task.pairs, n_eval, 0, seed, with_answer=True, queries=heldout, task_name=task.name)
        res["acc_tv_by_layer"] = [_accuracy(hm, tokenizer, zero, tv[l], l) for l in range(hm.n_layers)]
        per_task[task.name] = res
    names = list(per_task)
    mean = lambda key: sum(per_task[n][key] for n in names) / len(names)  # noqa: E731
    acc0, acc16 = mean("acc_0shot"), mean("acc_16shot")
    by_layer = [sum(per_task[n]["acc_tv_by_layer"][l] for n in names) / len(names) for l in range(hm.n_layers)]
    best_layer = max(range(hm.n_layers), key=lambda l: by_layer[l])
    own_best = sum(max(per_task[n]["acc_tv_by_layer"]) for n in names) / len(names)
    shared = shared_input_tasks(tasks)
    gap = max(acc16 - acc0, 1e-9)
    return {
        "mean_acc": {f"{k}shot": round(mean(f"acc_{k}shot"), 4) for k in SHOTS},
        "shared_input_tasks": shared,
        "shared_input_acc_0shot": round(sum(per_task[n]["acc_0shot"] for n in shared) / max(len(shared), 1), 4),
        "tv_acc_by_layer": [round(a, 4) for a in by_layer],
        "tv_best_layer": best_layer,
        "tv_gap_closed_best_layer": round((by_layer[best_layer] - acc0) / gap, 4),
        "tv_gap_closed_own_best_layer": round((own_best - acc0) / gap, 4),
        "per_task": per_task,
        "n_eval": n_eval,
        "seed": seed,
    }
