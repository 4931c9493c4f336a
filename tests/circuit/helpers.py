"""Tiny random dictionary suites and prompt batches for circuit tests."""

from __future__ import annotations

import torch

from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.dictionaries import io as _io  # noqa: F401  (registers the architectures)

KIND_SITE = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "transcoder"}


def tiny_suite(d_model: int, layers, d_sae: int = 64, arch: str = "standard", seed: int = 0,
               dtype: torch.dtype = torch.float32, model: str | None = None) -> dict:
    """{(kind, layer): Dictionary} with random weights and a small positive encoder bias."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for l in layers:
        for kind in ("resid", "attn", "transcoder"):
            cfg = DictConfig(d_in=d_model, d_sae=d_sae, arch=arch, site=KIND_SITE[kind], layer=l, model=model,
                             k=8 if arch == "topk" else 0)
            d = build(cfg)
            d.reset_parameters(generator=g)
            with torch.no_grad():
                if d.has_b_enc:
                    d.b_enc.uniform_(-0.1, 0.3, generator=g)
                d.b_dec.normal_(0, 0.1, generator=g)
            d.requires_grad_(False)
            out[(kind, l)] = d.to(dtype)
    return out


def toy_batch(lm, task: str = "antonyms", n_prompts: int = 3, n_shot: int = 4, seed: int = 0):
    from icl_cli.core.batch import encode_prompts
    from icl_cli.core.prompts import sample_prompts
    from icl_cli.core.tasks import resolve_tasks

    t = resolve_tasks(task)[0]
    return encode_prompts(lm.tokenizer, sample_prompts(t.pairs, n_prompts, n_shot, seed), device=lm.device)


def write_suite(folder, dicts: dict, model: str | None = None, name: str = "tiny-suite"):
    """A suite folder (manifest.json + one SAELens folder per dictionary) holding ``dicts``."""
    import json
    from pathlib import Path

    from icl_cli.dictionaries.io import save_saelens

    folder = Path(folder)
    entries = []
    for (kind, layer), d in dicts.items():
        sub = f"{kind}.{layer}"
        save_saelens(d, folder / sub)
        entries.append({"kind": kind, "layer": layer, "folder": sub})
    (folder / "manifest.json").write_text(json.dumps({"name": name, "model": model, "dictionaries": entries}))
    return folder


def tiny_toy64(tiny_toy_dir):
    """The conftest's tiny toy-vocabulary Gemma in float64 (a fresh copy), with its tokenizer."""
    from icl_cli.core.models import load_model

    lm = load_model(str(tiny_toy_dir), device="cpu")
    lm.model.to(torch.float64)
    return lm


def role_index(batch) -> torch.Tensor:
    """[B,P] group index by role (0..4), -1 for tokens without a role or padding (independent of splice.Groups)."""
    idx = batch.roles.long() - 1
    idx[(batch.roles == 0) | (batch.attention_mask == 0)] = -1
    return idx


def run_with_site_edit(hm, batch, key, fn):
    """Logits of one pass where dictionary site ``key`` writes fn(x_in, x_out) (independent of splice.py)."""
    from icl_cli.core.sites import Site

    kind, l = key
    if kind == "resid":
        edit = {Site("resid_pre", l): lambda x: fn(x, x)}
    elif kind == "attn":
        edit = {Site("attn_out", l): lambda x: fn(x, x)}
    else:
        box = {}
        edit = {Site("mlp_in", l): lambda x: box.setdefault("x", x),
                Site("mlp_out", l): lambda y: fn(box["x"], y)}
    return hm.run(batch.input_ids, batch.attention_mask, edit=edit).logits


def run_ablating_by_hand(hm, batch, dicts: dict, ablate: dict, index: torch.Tensor):
    """Logits of one pass where, at every dictionary site, the features marked in ``ablate[key]``
    [G,F] bool are set to 0 at the tokens whose group (``index`` [B,P], -1 = none) is marked, the
    error term kept (written here, independent of splice.py)."""
    from icl_cli.core.sites import Site

    box: dict = {}

    def write(key, x_in, x_out):
        d = dicts[key]
        a = d.encode(x_in)
        e = x_out - d.decode(a)
        mask = ablate.get(key)
        if mask is None:
            return x_out
        off = torch.zeros_like(a, dtype=torch.bool)
        for g in range(mask.shape[0]):
            off |= (index == g)[..., None] & mask[g]
        return d.decode(torch.where(off, torch.zeros_like(a), a)) + e

    edit = {}
    for key in dicts:
        kind, l = key
        if kind == "resid":
            edit[Site("resid_pre", l)] = lambda x, key=key: write(key, x, x)
        elif kind == "attn":
            edit[Site("attn_out", l)] = lambda x, key=key: write(key, x, x)
        else:
            edit[Site("mlp_in", l)] = lambda x, l=l: box.__setitem__(l, x) or x
            edit[Site("mlp_out", l)] = lambda y, key=key, l=l: write(key, box[l], y)
    return hm.run(batch.input_ids, batch.attention_mask, edit=edit).logits


def graph_masks(graph, rows, names: list[str], d_sae: int) -> dict:
    """{(kind, layer): [G,F] bool} marking the graph's feature nodes ``rows`` (G = len(names))."""
    out: dict = {}
    for i in rows:
        key = (str(graph.site[i]), int(graph.layer[i]))
        out.setdefault(key, torch.zeros(len(names), d_sae, dtype=torch.bool))
        out[key][names.index(str(graph.role[i])), int(graph.feature[i])] = True
    return out
