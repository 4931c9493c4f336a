"""Task vectors, detector vectors and layer sweeps (SPEC §4), and activation mass by role (§8).

For each task t:
1. Split its pairs (seeded) into a train part and held-out queries.
2. TV[t, l] = mean resid_pre[l] over every arrow token of ``n_prompts`` few-shot prompts built
   from the train part; DV[t, l] = the same mean over the output tokens.
3. On held-out 0-shot prompts: the 0-shot loss, and per layer the loss with TV[t, l] added to
   (paper, scale 1) or written into (Hendel) resid_pre[l] at the arrow; on held-out few-shot
   prompts, the few-shot loss. nll = summed NLL of the first n_first answer tokens; acc = greedy
   first answer token. The best layer has the lowest 0-shot + TV (added) loss; tasks the vector
   does not help at any layer, or that are solved at 0 shots, are flagged (collect_io).
4. With SAEs: each SAE's feature activations on the few-shot prompts, summed per token role.

HDF5 layout (one file, ``collect.h5``)::

    /layers [L]                               the swept layers
    /tasks/<t>/tv, /tasks/<t>/dv [L, D]       float32
    /tasks/<t>/sweep/<metric>                 scalars (zero_shot_*, few_shot_*), [L] (tv_*, tv_replace_*)
    /tasks/<t>/mass/<sae key> [6, d_sae]      role rows: none, prompt, input, arrow, output, newline
    /tasks/<t> attrs: best_layer, n_pairs, heldout (JSON list of held-out inputs)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from icl_cli.core.batch import encode_prompts
from icl_cli.core.layers import parse_layers
from icl_cli.core.prompts import ROLES, sample_prompts, split_pairs
from icl_cli.core.sites import HookedModel, Site
from icl_cli.core.steering import BaseCache, mean_at_role, plain_scores, sweep_scores
from icl_cli.core.tasks import Task
from icl_cli.core.errors import IclError
from icl_cli.collect.artifact import (FORMAT_VERSION, SWEEP_METRICS, CollectParams, mass_percent,  # noqa: F401 (re-exported)
                               summary_json, task_flags)

@dataclass
class TaskResult:
    tv: torch.Tensor  # [L, D]
    dv: torch.Tensor  # [L, D]
    sweep: dict[str, float | list[float]]
    best_layer: int
    heldout: list[str]
    n_pairs: int
    mass: dict[str, torch.Tensor] = field(default_factory=dict)  # sae key -> [6, d_sae]


def save_partial(r: TaskResult, path) -> None:
    """One finished task, for resuming an interrupted run (written atomically)."""
    import os

    from safetensors.torch import save_file

    tensors = {"tv": r.tv.contiguous(), "dv": r.dv.contiguous(), **{f"mass/{k}": m.contiguous() for k, m in r.mass.items()}}
    meta = {"sweep": json.dumps(r.sweep), "best_layer": str(r.best_layer), "heldout": json.dumps(r.heldout),
            "n_pairs": str(r.n_pairs)}
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_partial(path) -> TaskResult | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - a damaged partial result is recomputed
        return None
    mass = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("mass/")}
    return TaskResult(t["tv"], t["dv"], json.loads(meta["sweep"]), int(meta["best_layer"]), json.loads(meta["heldout"]),
                      int(meta["n_pairs"]), mass)


def task_split(task: Task, n_eval: int, seed: int) -> tuple[list, list]:
    """(train pairs, held-out pairs) used by collect and clean alike."""
    if len(task.pairs) < 4:
        raise IclError(f"task {task.name} has {len(task.pairs)} pairs; at least 4 are needed for a train/held-out split")
    return split_pairs(task.pairs, n_eval, seed)


def collect_task(hm: HookedModel, tokenizer, task: Task, layers: Sequence[int], p: CollectParams,
                 saes: Sequence[tuple[str, object]] = (), device=None) -> TaskResult:
    train, heldout = task_split(task, p.n_eval, p.seed)
    n_shot = p.n_shot
    if n_shot > len(train) - 1:
        raise IclError(f"task {task.name} keeps {len(train)} of its {len(task.pairs)} pairs for the examples "
                       f"(the rest are held out), so --n-shot can be at most {len(train) - 1}")
    few = sample_prompts(train, p.n_prompts, n_shot, p.seed, p.template, with_answer=True, task_name=task.name)
    means = mean_at_role(hm, tokenizer, few, layers, ("arrow", "output"), device=device)
    tv, dv = means["arrow"], means["output"]
    if not (torch.isfinite(tv).all() and torch.isfinite(dv).all()):
        raise IclError(f"the model produced NaN/inf activations on task {task.name}; run in float32 (--dtype float32)")

    zero = sample_prompts(task.pairs, p.n_eval, 0, p.seed + 1, p.template, queries=heldout, task_name=task.name)
    fs_eval = sample_prompts(task.pairs, p.n_eval, n_shot, p.seed + 2, p.template, queries=heldout, task_name=task.name)
    cache = BaseCache.build(hm, tokenizer, zero, layers, p.n_first, device)
    z = plain_scores(hm, tokenizer, zero, p.n_first, device)
    f = plain_scores(hm, tokenizer, fs_eval, p.n_first, device)
    sweep: dict[str, float | list[float]] = {"zero_shot_nll": z.nll, "zero_shot_acc": z.acc,
                                              "few_shot_nll": f.nll, "few_shot_acc": f.acc}
    swept = sweep_scores(hm, cache, layers, tv, ("add", "replace"))  # batched over layers
    for mode, prefix in (("add", "tv"), ("replace", "tv_replace")):
        rows = swept[mode]
        sweep[f"{prefix}_nll"] = [r.nll for r in rows]
        sweep[f"{prefix}_acc"] = [r.acc for r in rows]
    best = layers[min(range(len(layers)), key=lambda j: sweep["tv_nll"][j])]
    result = TaskResult(tv, dv, sweep, best, [x for x, _ in heldout], len(task.pairs))
    for key, sae in saes:
        result.mass[key] = role_mass(hm, tokenizer, few, sae, device)
    return result


@torch.no_grad()
def role_mass(hm: HookedModel, tokenizer, prompts, sae, device=None, batch_size: int = 16) -> torch.Tensor:
    """[1 + len(ROLES), d_sae]: feature activations summed over tokens of each role (row 0: no role)."""
    site = sae_site(sae, hm.n_layers)
    total = torch.zeros(1 + len(ROLES), sae.cfg.d_sae)
    for i in range(0, len(prompts), batch_size):
        batch = encode_prompts(tokenizer, prompts[i : i + batch_size], device=device)
        out = hm.run(batch.input_ids, batch.attention_mask, read=[site], stop_after=site.layer)
        acts = sae.encode(out.acts[site].to(sae.W_enc.device)).float()  # [B, P, d_sae]
        valid = batch.attention_mask.bool()  # padding and BOS carry no role mass
        if tokenizer.bos_token_id is not None:
            valid &= batch.input_ids != tokenizer.bos_token_id
        onehot = torch.nn.functional.one_hot(batch.roles.long(), 1 + len(ROLES)).float() * valid[..., None]
        total += torch.einsum("bpr,bpf->rf", onehot.to(acts.device), acts).cpu()
    return total


def sae_site(sae, n_layers: int) -> Site:
    """The site a dictionary reads (a transcoder reads mlp_in)."""
    cfg = sae.cfg
    if cfg.layer is None:
        raise IclError("the SAE does not say which layer it belongs to; re-import it with its layer")
    if not 0 <= cfg.layer < n_layers:
        raise IclError(f"the SAE is for layer {cfg.layer} but the model has layers 0-{n_layers - 1}")
    kind = {"resid_pre": "resid_pre", "attn_out": "attn_out", "transcoder": "mlp_in"}.get(cfg.site)
    if kind is None:
        raise IclError(f"unsupported SAE site {cfg.site!r}")
    return Site(kind, cfg.layer)


def run_collect(lm, tasks: Sequence[Task], p: CollectParams, saes: Sequence[tuple[str, object]] = (),
                progress: Callable[[str], None] | None = None, work_dir=None) -> tuple[list[int], dict[str, TaskResult]]:
    """Every task in turn; with ``work_dir``, finished tasks are kept there and skipped on a rerun."""
    hm = HookedModel(lm.model)
    layers = parse_layers(p.layers, hm.n_layers)
    for key, sae in saes:
        if sae.cfg.d_in != hm.d_model:
            raise IclError(f"SAE {key[:12]} has d_in {sae.cfg.d_in} but the model's d_model is {hm.d_model}")
        sae_site(sae, hm.n_layers)
    results = {}
    for i, task in enumerate(tasks):
        if progress:
            progress(task.name)
        part = work_dir / f"task{i}.safetensors" if work_dir is not None else None
        done = load_partial(part) if part is not None and part.exists() else None
        if done is None:
            done = collect_task(hm, lm.tokenizer, task, layers, p, saes, device=lm.device)
            if part is not None:
                save_partial(done, part)
        results[task.name] = done
    return layers, results


def write_h5(f, layers: Sequence[int], results: dict[str, TaskResult]) -> None:
    f.create_dataset("layers", data=list(layers))
    for name, r in results.items():
        g = f.create_group(f"tasks/{name}")
        g.create_dataset("tv", data=r.tv.numpy())
        g.create_dataset("dv", data=r.dv.numpy())
        for k, v in r.sweep.items():
            g.create_dataset(f"sweep/{k}", data=v)
        for key, m in r.mass.items():
            g.create_dataset(f"mass/{key}", data=m.numpy())
        g.attrs["best_layer"] = r.best_layer
        g.attrs["n_pairs"] = r.n_pairs
        g.attrs["heldout"] = json.dumps(r.heldout)


def read_h5(path) -> tuple[list[int], dict[str, TaskResult]]:
    """Read a collect artifact back (raises IclError on a file that is not one)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            layers = [int(x) for x in f["layers"][()]]
            results = {}
            for name, g in f["tasks"].items():
                sweep = {k: (v[()].tolist() if v.shape else float(v[()])) for k, v in g["sweep"].items()}
                mass = {k: torch.from_numpy(v[()]) for k, v in g["mass"].items()} if "mass" in g else {}
                results[name] = TaskResult(torch.from_numpy(g["tv"][()]), torch.from_numpy(g["dv"][()]), sweep,
                                           int(g.attrs["best_layer"]), json.loads(g.attrs["heldout"]),
                                           int(g.attrs["n_pairs"]), mass)
    except (OSError, KeyError) as exc:
        raise IclError(f"{path} is not a readable collect artifact ({exc}); run `icl store verify`") from None
    return layers, results
