"""Training a dictionary suite and writing its folder (the layout is in suite.py).

    members = train_suite(lm, TrainConfig(layers=[19, 20, 21], arch="topk", ...))  # train_sae/suite.py
    manifest = write_suite(folder, members, lm, name="smollm2-suite", training={...})
    fvus = check_fvu(lm, {("resid", 3): d, ...}, CHECK)

scripts/toy_saes.sh trains the toy suite one site at a time through `icl train-sae` (members are
store artifacts); icl_cli/zoo/smollm2_suite.py trains every kind and layer of the SmolLM2 suite
together with train_suite, on forward passes that stop after the highest layer (members are the
trained dictionaries themselves).

The weights are stored in float16 (half the bytes; the FVU they give is measured and stored
as check_fvu next to the training metrics).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch

from icl_cli.dictionaries.base import Dictionary
from icl_cli.dictionaries.suite import KIND_SITE, KINDS, MANIFEST

CHECK = {"task": "antonyms", "n_prompts": 4, "n_shot": 8, "seed": 0}
"""The prompts whose FVU every manifest records (check_fvu): every token but the first and padding."""
METRICS = ("l0", "fvu", "dead_fraction", "ce_clean", "ce_spliced", "ce_zero", "ce_recovered", "eval_tokens")


def check_batch(lm, check: dict = CHECK):
    """(input_ids [B,P], attention_mask [B,P], keep [B,P] bool) of the check prompts; keep drops
    padding, BOS and the first token (without a BOS, the first token is the attention sink, whose
    residual norm is tens of times the others' on SmolLM2: no dictionary is trained on it)."""
    from icl_cli.core.batch import encode_prompts
    from icl_cli.core.prompts import sample_prompts
    from icl_cli.core.tasks import resolve_tasks

    (task,) = resolve_tasks(check["task"])
    prompts = sample_prompts(task.pairs, n_prompts=check["n_prompts"], n_shot=check["n_shot"], seed=check["seed"],
                             task_name=task.name)
    batch = encode_prompts(lm.tokenizer, prompts, device=lm.device)
    keep = batch.attention_mask.bool()
    keep[:, 0] = False
    bos = lm.tokenizer.bos_token_id
    if bos is not None:
        keep &= batch.input_ids != bos
    return batch.input_ids, batch.attention_mask, keep


def sites_of(kind: str, layer: int):
    """(input site, target site) a dictionary of `kind` at `layer` reads and reconstructs."""
    from icl_cli.core.sites import Site

    if kind == "transcoder":
        return Site("mlp_in", layer), Site("mlp_out", layer)
    return Site(KIND_SITE[kind], layer), Site(KIND_SITE[kind], layer)


@torch.no_grad()
def check_fvu(lm, dicts: dict[tuple[str, int], Dictionary], check: dict = CHECK) -> dict[tuple[str, int], float]:
    """FVU Σ‖t − t̂‖² / Σ‖t − mean t‖² of each dictionary on the check prompts (one forward pass)."""
    from icl_cli.core.sites import HookedModel

    ids, mask, keep = check_batch(lm, check)
    reads = {s for kind, layer in dicts for s in sites_of(kind, layer)}
    acts = HookedModel(lm.model).run(ids, mask, read=reads, stop_after=max(s.layer for s in reads)).acts
    out = {}
    for (kind, layer), d in dicts.items():
        s_in, s_out = sites_of(kind, layer)
        x, t = acts[s_in][keep].float(), acts[s_out][keep].float()
        t_hat = d(x).float()
        out[(kind, layer)] = float((t - t_hat).pow(2).sum() / (t - t.mean(0)).pow(2).sum())
    return out


def write_suite(folder: Path | str, members: Sequence[tuple[str, int, object]], lm, name: str,
                training: dict, check: dict = CHECK) -> dict:
    """Write float16 SAELens folders of `members` and the manifest.

    members: (kind, layer, source), source a train-sae artifact (path, metrics, key) or a trained
    dictionary (train_sae.trainer.Trained: sae, metrics, sparsity). Returns the manifest (also
    written to folder/manifest.json).
    """
    from icl_cli.core.identity import model_fingerprint
    from icl_cli.dictionaries.io import load_dictionary, read_sparsity, save_saelens

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries, stored = [], {}
    for kind, layer, src in sorted(members, key=lambda m: (m[1], KINDS.index(m[0]))):
        trained = hasattr(src, "sae")
        d = (copy.deepcopy(src.sae) if trained else load_dictionary(src.path)).half()
        d.cfg.dtype = "float16"
        sub = f"{kind}.{layer}"
        save_saelens(d, folder / sub, sparsity=src.sparsity if trained else read_sparsity(src.path))
        stored[(kind, layer)] = load_dictionary(folder / sub)  # what users will load
        m = src.metrics or {}
        entries.append({"kind": kind, "layer": layer, "folder": sub, "arch": d.cfg.arch, "d_sae": d.cfg.d_sae,
                        **{k: m.get(k) for k in METRICS}, "source_key": None if trained else src.key})
    fvus = check_fvu(lm, stored, check)
    for e in entries:
        e["check_fvu"] = fvus[(e["kind"], e["layer"])]
    manifest = {"name": name, "model": stored[next(iter(stored))].cfg.model, "model_fingerprint": model_fingerprint(lm.model),
                "dtype": "float16", "training": training, "check": check, "dictionaries": entries}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
