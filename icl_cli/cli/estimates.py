"""`icl clean --estimate` and `icl train-sae --estimate`: the memory a run needs, from shapes only
(icl_cli/core/memory.py). Nothing heavy is loaded: the model's config, its tokenizer, and for
clean the SAE (for its width and layer)."""

from __future__ import annotations

from icl_cli.cli.context import emit


def _shape(gl, model: str):
    """(ModelShape, device) of ``model`` in the run's dtype, from its config alone."""
    import torch

    from icl_cli.core.memory import ModelShape
    from icl_cli.core.models import load_config, resolve_device, resolve_dtype

    config = load_config(model, gl.trust_remote_code)
    device = resolve_device(gl.device)
    dtype = resolve_dtype(gl.dtype, device)
    return ModelShape.of(config, torch.tensor([], dtype=dtype).element_size()), device


def _free(device) -> float | None:
    from icl_cli.circuit.estimate import free_memory

    free = free_memory(device)
    return None if free is None else free / (1 << 30)


def clean_estimate(gl, store, cp: dict, tv_art, sae_art, sae: str, layer: int | None, p, tasks) -> None:
    """Memory of the largest task of a clean run (the caches and steps of one task at a time)."""
    from icl_cli.clean.cleaning import _prompts, validation_queries
    from icl_cli.cli.clean_cmd import _checked_spec
    from icl_cli.collect.vectors import task_split
    from icl_cli.core.batch import encode_prompts
    from icl_cli.core.memory import clean_memory
    from icl_cli.core.models import load_tokenizer

    lay, d = _checked_spec(gl, store, sae_art, sae, cp, tv_art, layer, lambda lay, dtype: lay)
    shape, device = _shape(gl, cp["model"])
    tok = load_tokenizer(cp["model"], gl.trust_remote_code)
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
    data = {"model": cp["model"], "tasks": len(tasks), "free_gib": _free(device), **est.to_json()}
    emit(gl, data, table=lambda: _table(f"clean estimate: {cp['model']}, layer {lay}", data,
                                        f"one task at a time: SAE of {d.cfg.d_sae} features, prompts of ≤ {P} tokens; "))


def train_sae_estimate(gl, cfg, layers) -> None:
    """Memory of one train-sae run (every layer's dictionary shares the forward passes)."""
    from icl_cli.core.layers import parse_layers
    from icl_cli.core.memory import train_sae_memory

    shape, device = _shape(gl, cfg.model)
    chosen = parse_layers(layers, shape.n_layers)
    width = cfg.width or 16 * shape.d_model
    est = train_sae_memory(shape, width, len(chosen), cfg.site == "transcoder", cfg.arch, cfg.batch_tokens,
                           cfg.buffer_batches, cfg.ctx, store_bytes=4 if device.type == "cpu" else 2)
    data = {"model": cfg.model, "layers": chosen, "free_gib": _free(device), **est.to_json()}
    emit(gl, data, table=lambda: _table(f"train-sae estimate: {cfg.model}", data,
                                        f"{len(chosen)} {cfg.arch} dictionaries of {width} features; "))


def _table(title: str, data: dict, what: str):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("phase")
    t.add_column("working memory GiB", justify="right")
    for k, v in data["phases_gib"].items():
        t.add_row(k + (" (peak)" if k == data["phase"] else ""), f"{v:.3f}")
    free = data["free_gib"]
    fits = "" if free is None else f"; free {free:.1f} GiB: {'fits' if data['total_gib'] <= free else 'does NOT fit'}"
    t.caption = (f"{what}weights {data['resident_gib']:.3f} GiB + peak {data['peak_gib']:.3f} GiB = {data['total_gib']:.3f} GiB"
                 f"{fits} (icl_cli/core/memory.py; within ±6% of measured peaks on scaled-down models)")
    return t
