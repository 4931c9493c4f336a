"""``icl clean --estimate``: the memory of the largest task of a clean run, from shapes only
(icl_cli/core/memory.py). Nothing heavy is loaded: the model's config, its tokenizer and the SAE
(for its width and layer).

    est = estimate_clean(env, CleanRequest(tv="pipeline-tv", sae="sae-5"))
    est.data["total_gib"]
"""

from __future__ import annotations

from dataclasses import dataclass

from icl_cli.clean.step import CleanRequest, checked_spec, clean_inputs
from icl_cli.core.runenv import RunEnv


@dataclass
class CleanEstimate:
    data: dict
    """The JSON document: model, tasks, free_gib and the Phased estimate (core/memory.py)."""
    layer: int
    d_sae: int
    """The SAE's width."""
    max_tokens: int
    """The longest prompt of any task, in tokens."""


def estimate_clean(env: RunEnv, req: CleanRequest) -> CleanEstimate:
    """Memory of the largest task of a clean run (the caches and steps of one task at a time)."""
    from icl_cli.clean.cleaning import _prompts, validation_queries
    from icl_cli.collect.vectors import task_split
    from icl_cli.core.batch import encode_prompts
    from icl_cli.core.memory import clean_memory
    from icl_cli.core.models import load_tokenizer
    from icl_cli.train_sae.estimate import free_gib, model_shape

    ins = clean_inputs(env, req)
    cp, p, tasks = ins.cp, ins.p, [ins.suite[t] for t in ins.names]
    lay, d = checked_spec(env, ins.sae_art, req.sae, cp, ins.tv_art, req.layer, lambda lay, dtype: lay)
    shape, device = model_shape(env, cp["model"])
    tok = load_tokenizer(cp["model"], env.trust_remote_code)
    n_eval, seed, template = cp["n_eval"], cp["seed"], cp["template"]
    P = 0
    for t in tasks:  # the prompts clean_task builds, tokenised (no model)
        train, heldout = task_split(t, n_eval, seed)
        sets = [_prompts(train, train, p.n_train, p.seed + 3, p.detectors, template, t.name),
                _prompts(t.pairs, heldout, n_eval, seed + 1, p.detectors, template, t.name)]
        if p.auto:
            sets.append(_prompts(train, validation_queries(train, sets[0]), p.n_val, p.seed + 4, p.detectors, template,
                                 t.name))
        P = max([P] + [encode_prompts(tok, s, n_first=cp["n_first"]).input_ids.shape[1] for s in sets])
    est = clean_memory(shape, d.cfg.d_sae, lay, P, p.n_train, n_eval, p.n_val if p.auto else 0, cp["n_first"])
    data = {"model": cp["model"], "tasks": len(tasks), "free_gib": free_gib(device), **est.to_json()}
    return CleanEstimate(data, lay, d.cfg.d_sae, P)
