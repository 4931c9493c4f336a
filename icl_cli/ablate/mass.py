"""Activation mass by token role of a chosen feature set (SPEC §8; Kharlapenko et al. 2025, §4.2).

For a set of features of one dictionary and the few-shot prompts of a task:
1. The dictionary's activations a [B, P, d_sae] at its site on every real token (BOS excluded).
2. Token roles with inputs and outputs as whole words: every token holding a character of an
   input (output) belongs to it, so a multi-token word counts whole (``word_roles``); arrows,
   newlines and the instruction as in ``core.batch``.
3. mass[r, f] = Σ over tokens of role r of a_f (row 0: tokens without a role).
A task's own set (its executors, detectors or kept features, best first) is measured on that
task's prompts. Two figures:
- per-feature share (the paper's): for the task's best feature f, share[r] = mass[r, f] / Σ_r mass[r, f];
  then the mean of these shares over the tasks (tasks with an empty set are listed apart);
- pooled share: the masses of every feature of every task's set summed before dividing (a
  different quantity: large features dominate it).
*Paper*: executors (Gemma-1 2B, layer 12) 89.8% on arrows; detectors (layer 11) 96.8% on outputs,
as per-feature shares over one best feature per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from icl_cli.ablate.feature_ablation import AblateParams, few_shot_prompts
from icl_cli.collect.vectors import mass_percent, sae_site
from icl_cli.core.batch import encode_prompts
from icl_cli.core.prompts import ROLE_CODE, ROLES
from icl_cli.core.sites import HookedModel
from icl_cli.core.tasks import Task
from icl_cli.core.errors import IclError

FORMAT_VERSION = 2
"""2: inputs and outputs as whole words; the per-feature share over each task's best feature."""
ROW_NAMES = ("none",) + ROLES


@dataclass
class MassResult:
    tasks: list[str]
    features: dict[str, list[int]]  # task -> the features measured on it (best first)
    mass: dict[str, Tensor]  # task -> [1 + len(ROLES), k] summed activations
    empty: list[str] = field(default_factory=list)  # tasks whose set is empty: not measured

    def percent(self, task: str | None = None) -> dict[str, float]:
        """Pooled share of the activation per role, for one task's set or summed over every task's set."""
        if task is not None:
            return mass_percent(self.mass[task])
        rows = sum((m.sum(-1) for m in self.mass.values()), torch.zeros(len(ROW_NAMES)))
        return mass_percent(rows[:, None])

    def best_share(self, task: str) -> dict[str, float]:
        """Share per role of the task's best feature (the first of its set)."""
        return mass_percent(self.mass[task], [0])

    def per_feature(self) -> dict[str, float]:
        """The paper's figure: the mean over tasks of the best feature's share per role."""
        shares = [self.best_share(t) for t in self.tasks if float(self.mass[t][:, 0].sum()) > 0]
        if not shares:
            return {k: float("nan") for k in ROW_NAMES}
        return {k: sum(s[k] for s in shares) / len(shares) for k in ROW_NAMES}


def word_roles(tokenizer, prompts, batch) -> Tensor:
    """[B, P] long role rows of ``batch`` (encoded from ``prompts``) with inputs and outputs as whole
    words: a token without a role that holds a character of an input (output) segment gets that role."""
    enc = tokenizer([p.text for p in prompts], return_offsets_mapping=True, add_special_tokens=True)
    rows = batch.roles.long().clone().cpu()
    for b, (pr, offsets) in enumerate(zip(prompts, enc["offset_mapping"])):
        for start, end, kind, _ in pr.segments:
            if kind not in ("input", "output"):
                continue
            for tok, (s, e) in enumerate(offsets):
                if e > s and s < end and e > start and rows[b, tok] == 0:
                    rows[b, tok] = ROLE_CODE[kind]
    return rows


@torch.no_grad()
def set_mass(hm: HookedModel, tokenizer, prompts, sae, ids: Sequence[int], device=None, batch_size: int = 16) -> Tensor:
    """[1 + len(ROLES), k]: activations of features ``ids`` summed over the tokens of each role
    (inputs and outputs as whole words, ``word_roles``; padding and BOS carry no mass)."""
    site = sae_site(sae, hm.n_layers)
    cols = torch.as_tensor(list(ids), dtype=torch.long)
    total = torch.zeros(len(ROW_NAMES), len(cols))
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        batch = encode_prompts(tokenizer, chunk, device=device)
        out = hm.run(batch.input_ids, batch.attention_mask, read=[site], stop_after=site.layer)
        acts = sae.encode(out.acts[site].to(sae.W_enc.device)).float()[..., cols.to(sae.W_enc.device)].cpu()  # [B, P, k]
        valid = batch.attention_mask.bool().cpu()
        if tokenizer.bos_token_id is not None:
            valid &= batch.input_ids.cpu() != tokenizer.bos_token_id
        onehot = torch.nn.functional.one_hot(word_roles(tokenizer, chunk, batch), len(ROW_NAMES)).float() * valid[..., None]
        total += torch.einsum("bpr,bpf->rf", onehot, acts)
    return total


@torch.no_grad()
def feature_mass(hm: HookedModel, tokenizer, tasks: Sequence[Task], sets: Mapping[str, Sequence[int]], sae,
                 p: AblateParams, device=None, progress: Callable[[str], None] | None = None) -> MassResult:
    """sets: task -> feature ids of ``sae`` (a set under another name, e.g. "given", is used for every task)."""
    mass, feats, empty = {}, {}, []
    for t in tasks:
        ids = list(sets.get(t.name, sets.get("given", [])))
        bad = [f for f in ids if not 0 <= f < sae.cfg.d_sae]
        if bad:
            raise IclError(f"feature(s) {bad} are beyond the SAE's width {sae.cfg.d_sae}")
        if progress:
            progress(t.name)
        if not ids:
            empty.append(t.name)
            continue
        mass[t.name], feats[t.name] = set_mass(hm, tokenizer, few_shot_prompts(t, p), sae, ids, device), ids
    if not mass:
        raise IclError("no task has any feature to measure (every task's set is empty); check the feature set and --tasks")
    return MassResult(list(mass), feats, mass, empty)


def write_h5(f, r: MassResult) -> None:
    """/roles [6] str, /tasks [T] str, /mass/<task> [6, k] float32, /features/<task> int64."""
    import h5py

    f.create_dataset("roles", data=list(ROW_NAMES), dtype=h5py.string_dtype())
    f.create_dataset("tasks", data=r.tasks, dtype=h5py.string_dtype())
    for t in r.tasks:
        f.create_dataset(f"mass/{t}", data=r.mass[t].numpy())
        f.create_dataset(f"features/{t}", data=torch.tensor(r.features[t], dtype=torch.long).numpy())
    f.create_dataset("empty", data=list(r.empty), dtype=h5py.string_dtype())


def read_h5(path) -> MassResult:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            dec = lambda ds: [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]  # noqa: E731
            tasks = dec(f["tasks"])
            return MassResult(tasks, {t: f[f"features/{t}"][()].tolist() for t in tasks},
                              {t: torch.from_numpy(f[f"mass/{t}"][()]) for t in tasks},
                              dec(f["empty"]) if "empty" in f else [])
    except (OSError, KeyError) as exc:
        raise IclError(f"{path} is not a readable activation-mass artifact ({exc}); run `icl store verify`") from None


def summary_json(key: str, r: MassResult, what: str) -> dict:
    per_task = {t: {"features": r.features[t], "percent": r.percent(t),
                    "per_feature": {str(f): mass_percent(r.mass[t], [i]) for i, f in enumerate(r.features[t])}}
                for t in r.tasks}
    return {"key": key, "set": what, "per_feature_percent": r.per_feature(), "pooled_percent": r.percent(),
            "tasks": per_task, "best": {t: r.features[t][0] for t in r.tasks}, "empty": r.empty,
            "paper": {"executors_arrow": 89.8, "detectors_output": 96.8,
                      "definition": "mean over tasks of one best feature's share per role"}}
