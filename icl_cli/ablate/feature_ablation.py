"""Feature-set ablation on few-shot prompts (issue 9; SPEC §7-8; Kharlapenko et al. 2025, §4).

    sets = {"antonyms": {sae_key: [12, 40]}, ...}        # set name -> dictionary -> feature ids
    r = run_ablation(hm, tok, tasks, sets, saes, AblateParams(roles=("arrow",), mode="zero"))

For every feature set S and every measured task t:
1. Few-shot prompts of t with held-out queries (the split of ``collect``, so nothing measured
   was used to build a task vector or to clean it).
2. At each dictionary's site, on the tokens of the chosen roles only, the features of S are set
   to a′ (0, or their mean clean activation over tokens of the same role, ``mode="mean"``) while
   the rest of the reconstruction and the error term are kept:
       x′ = decode(a′) + (x − decode(a)) = x + Σ_{f∈S} (a′_f − a_f) W_dec[f]
   (a transcoder reads mlp_in and the change is written at mlp_out). Written as a difference,
   ablating nothing leaves x bit-for-bit unchanged.
3. nll (first ``n_first`` answer tokens of the query), acc and all_pairs_logprob (SPEC §3) of
   the ablated run beside the clean one. Without ``cross_task`` a task's own set is measured on
   that task only; with it, every set on every task (ablate the features of A, measure B).
4. What can be read from it (SPEC §7): the rise of a loss, ``loss_rise``, on the query's answer
   (``nll``) or over every pair but the first (``apl``: −all_pairs_logprob, the circuit metric,
   which includes the early pairs a model still gets wrong). A task whose clean loss on the
   metric is under ``FLOOR_NLL`` cannot show a rise: it reads "cannot detect", never 0. A set
   without features measures nothing: it is listed apart and left out of every mean.
   The cross-task summaries use ``apl`` by default: on a model that solves the query at the
   floor (the toy model: 19-shot nll 0.00-0.04), the early pairs still carry loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from icl_cli.collect.vectors import sae_site, task_split
from icl_cli.core.batch import PromptBatch, encode_prompts
from icl_cli.core.metrics import all_pairs_logprob, correct, nll_per_prompt
from icl_cli.core.prompts import ROLES, Prompt, get_template, sample_prompts
from icl_cli.core.sites import Edit, HookedModel, Site
from icl_cli.core.tasks import Task
from icl_cli.core.errors import IclError

FORMAT_VERSION = 1
ROLE_CHOICES = ROLES + ("all",)
METRICS = ("nll", "acc", "apl")
LOSSES = ("apl", "nll")
"""The losses a cross-task summary can read (``loss_rise``); the first is the default."""
FLOOR_NLL = 0.05
"""A clean loss under this many nats is at its floor: an ablation cannot show a rise on it (SPEC §7)."""
N_ROLE_ROWS = 1 + len(ROLES)  # row 0: tokens without a role

FeatureSets = Mapping[str, Mapping[str, Sequence[int]]]
"""set name -> dictionary key -> feature ids."""


@dataclass
class AblateParams:
    roles: tuple[str, ...] = ("arrow",)
    """Token roles whose features are ablated (prompt, input, arrow, output, newline, all)."""
    mode: str = "zero"
    """zero: a′ = 0; mean: a′ = the feature's mean clean activation on tokens of the same role."""
    n_shot: int = 19
    """Examples per few-shot prompt."""
    n_eval: int = 32
    """Prompts per task (held-out queries)."""
    template: str = "paper"
    """paper | hendel | todd."""
    n_first: int = 2
    """Answer tokens scored by nll."""
    seed: int = 0
    """Seed of the train/held-out split (the collect artifact's) and of the prompts."""
    cross_task: bool = False
    """Measure every feature set on every task."""

    def __post_init__(self) -> None:
        get_template(self.template)
        self.roles = tuple(self.roles)
        bad = [r for r in self.roles if r not in ROLE_CHOICES]
        if bad or not self.roles:
            raise IclError(f"unknown role(s) {', '.join(bad) or '(none)'}; --roles takes a comma-separated list of {', '.join(ROLE_CHOICES)}")
        if self.mode not in ("zero", "mean"):
            raise IclError(f"--mode must be zero or mean, not {self.mode!r}")
        if self.n_shot < 1 or self.n_eval < 1 or self.n_first < 1:
            raise IclError("--n-shot, --n-prompts and --n-first must be ≥ 1")


@dataclass
class AblateResult:
    sets: list[str]
    tasks: list[str]
    base: dict[str, Tensor]  # metric -> [T]
    ablated: dict[str, Tensor]  # metric -> [S, T], NaN where not measured
    features: dict[str, dict[str, list[int]]] = field(default_factory=dict)


def few_shot_prompts(task: Task, p: AblateParams, with_answer: bool = True) -> list[Prompt]:
    """The held-out few-shot prompts of a task: collect's evaluation prompts for the same settings."""
    train, heldout = task_split(task, p.n_eval, p.seed)
    if p.n_shot > len(task.pairs) - 1:
        raise IclError(f"task {task.name} has {len(task.pairs)} pairs, so --n-shot can be at most {len(task.pairs) - 1}")
    return sample_prompts(task.pairs, p.n_eval, p.n_shot, p.seed + 2, p.template, with_answer=with_answer,
                          queries=heldout, task_name=task.name)


def valid_tokens(batch: PromptBatch, tokenizer) -> Tensor:
    """[B, P] bool: real tokens other than BOS (padding and BOS carry no role and are never ablated)."""
    valid = batch.attention_mask.bool()
    if tokenizer.bos_token_id is not None:
        valid &= batch.input_ids != tokenizer.bos_token_id
    return valid


def role_positions(batch: PromptBatch, roles: Sequence[str], tokenizer) -> Tensor:
    """[B, P] bool: the tokens holding any of ``roles`` ("all": every valid token)."""
    valid = valid_tokens(batch, tokenizer)
    if "all" in roles:
        return valid
    mask = torch.zeros_like(valid)
    for r in roles:
        mask |= batch.role_mask(r)
    return mask & valid


def role_rows(batch: PromptBatch) -> Tensor:
    """[B, P] long: each token's row in a [1 + len(ROLES), …] role table (0: no role)."""
    return batch.roles.long()


def ablation_edit(sae, features: Tensor, mask: Tensor, target: Tensor | None = None,
                  rows: Tensor | None = None, source: dict | None = None) -> Edit:
    """fn(x) = x + mask · Σ_f (a′_f − a_f) W_dec[f] for the features ``features`` [k].

    mask [B, P] bool. target: None (a′ = 0) or [R, k] per-role values picked by ``rows`` [B, P].
    source: for a transcoder, a dict whose "x" is the mlp_in read in the same pass.
    """

    def fn(x: Tensor) -> Tensor:
        inp = x if source is None else source["x"]
        a = sae.encode(inp.to(sae.W_enc.device))[..., features]  # [B, P, k]
        a_new = torch.zeros_like(a) if target is None else target.to(a)[rows.to(a.device)]
        m = mask.to(a.device)[..., None].to(a.dtype)
        delta = ((a_new - a) * m) @ sae.W_dec[features]  # [B, P, d_out]
        return x + delta.to(device=x.device, dtype=x.dtype)

    return fn


def _capture(store: dict) -> Edit:
    def fn(x: Tensor) -> Tensor:
        store["x"] = x
        return x

    return fn


def write_site(sae, n_layers: int) -> Site:
    """Where a dictionary's reconstruction is written (a transcoder writes mlp_out)."""
    read = sae_site(sae, n_layers)
    return Site("mlp_out", read.layer) if read.kind == "mlp_in" else read


def ablation_edits(saes: Mapping[str, object], chosen: Mapping[str, Sequence[int]], mask: Tensor, n_layers: int,
                   means: Mapping[str, Tensor] | None = None, rows: Tensor | None = None) -> dict[Site, Edit]:
    """Site -> edit for one feature set (dictionary key -> ids); dictionaries with no ids add no edit.

    means: dictionary key -> [1 + len(ROLES), d_sae] mean activations (mode mean), else zero.
    """
    edits: dict[Site, Edit] = {}
    for key, ids in chosen.items():
        if not len(ids):
            continue
        sae = saes[key]
        feats = torch.as_tensor(list(ids), dtype=torch.long, device=sae.W_dec.device)
        target = None if means is None else means[key][:, feats.cpu()]
        site = write_site(sae, n_layers)
        if site in edits:
            raise IclError(f"two dictionaries write {site}; ablate the features of one dictionary per site")
        source = None
        if site.kind == "mlp_out":
            source = {}
            edits[Site("mlp_in", site.layer)] = _capture(source)
        edits[site] = ablation_edit(sae, feats, mask, target, rows, source)
    return edits


@torch.no_grad()
def mean_activations(hm: HookedModel, tokenizer, prompt_sets: Sequence[Sequence[Prompt]], saes: Mapping[str, object],
                     device=None) -> dict[str, Tensor]:
    """Dictionary key -> [1 + len(ROLES), d_sae]: mean clean activation per token role (a′ of mode mean)."""
    from icl_cli.collect.vectors import role_mass

    out = {}
    for key, sae in saes.items():
        total = torch.zeros(N_ROLE_ROWS, sae.cfg.d_sae)
        count = torch.zeros(N_ROLE_ROWS)
        for prompts in prompt_sets:
            total += role_mass(hm, tokenizer, prompts, sae, device)
            for i in range(0, len(prompts), 16):
                batch = encode_prompts(tokenizer, prompts[i : i + 16])
                valid = valid_tokens(batch, tokenizer)
                count += torch.bincount(batch.roles.long()[valid], minlength=N_ROLE_ROWS).float()
        out[key] = total / count.clamp(min=1)[:, None]
    return out


def _metrics(logits: Tensor, batch: PromptBatch) -> dict[str, float]:
    return {"nll": nll_per_prompt(logits, batch).mean().item(), "acc": correct(logits, batch).float().mean().item(),
            "apl": all_pairs_logprob(logits, batch).item()}


@torch.no_grad()
def run_ablation(hm: HookedModel, tokenizer, tasks: Sequence[Task], sets: FeatureSets, saes: Mapping[str, object],
                 p: AblateParams, device=None, progress: Callable[[str], None] | None = None) -> AblateResult:
    """Every feature set on its own task (or on every task with ``cross_task``); see the module docstring.

    A set named after a task is measured on that task; a set with another name ("given") on every task.
    """
    names = [t.name for t in tasks]
    set_names = list(sets)
    prompts = {t.name: few_shot_prompts(t, p) for t in tasks}
    means = mean_activations(hm, tokenizer, list(prompts.values()), saes, device) if p.mode == "mean" else None
    start = min((sae_site(s, hm.n_layers).layer for s in saes.values()), default=0)
    base = {m: torch.full((len(names),), float("nan")) for m in METRICS}
    abl = {m: torch.full((len(set_names), len(names)), float("nan")) for m in METRICS}
    for j, t in enumerate(names):
        if progress:
            progress(t)
        batch = encode_prompts(tokenizer, prompts[t], n_first=p.n_first, device=device)
        below = hm.run(batch.input_ids, batch.attention_mask, read=[Site("resid_pre", start)], stop_after=start)
        resid = below.acts[Site("resid_pre", start)]  # the blocks below every dictionary run once
        mask = role_positions(batch, p.roles, tokenizer)
        rows = role_rows(batch)
        logits = hm.run(batch.input_ids, batch.attention_mask, start_at=start, start_resid=resid).logits
        for m, v in _metrics(logits, batch).items():
            base[m][j] = v
        for i, s in enumerate(set_names):
            if not (p.cross_task or s == t or s not in names):
                continue
            edits = ablation_edits(saes, sets[s], mask, hm.n_layers, means, rows)
            logits = hm.run(batch.input_ids, batch.attention_mask, edit=edits, start_at=start, start_resid=resid).logits
            for m, v in _metrics(logits, batch).items():
                abl[m][i, j] = v
    feats = {s: {k: [int(f) for f in ids] for k, ids in sets[s].items()} for s in set_names}
    return AblateResult(set_names, names, base, abl, feats)


def write_h5(f, r: AblateResult, p: AblateParams) -> None:
    """/sets [S] str, /tasks [T] str, /base/<m> [T], /ablated/<m> [S, T] (NaN: not measured),
    /features/<set>/<dictionary key> int64; attrs roles, mode, cross_task."""
    import h5py

    str_t = h5py.string_dtype()
    f.create_dataset("sets", data=r.sets, dtype=str_t)
    f.create_dataset("tasks", data=r.tasks, dtype=str_t)
    for m in METRICS:
        f.create_dataset(f"base/{m}", data=r.base[m].numpy())
        f.create_dataset(f"ablated/{m}", data=r.ablated[m].numpy())
    for s, by_key in r.features.items():
        for k, ids in by_key.items():
            f.create_dataset(f"features/{s}/{k}", data=torch.tensor(ids, dtype=torch.long).numpy())
    f.attrs["roles"] = ",".join(p.roles)
    f.attrs["mode"] = p.mode
    f.attrs["cross_task"] = p.cross_task


def read_h5(path) -> AblateResult:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            dec = lambda ds: [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]  # noqa: E731
            feats = {s: {k: v[()].tolist() for k, v in g.items()} for s, g in f["features"].items()} if "features" in f else {}
            return AblateResult(dec(f["sets"]), dec(f["tasks"]),
                                {m: torch.from_numpy(f[f"base/{m}"][()]) for m in METRICS},
                                {m: torch.from_numpy(f[f"ablated/{m}"][()]) for m in METRICS}, feats)
    except (OSError, KeyError) as exc:
        raise IclError(f"{path} is not a readable ablate artifact ({exc}); run `icl store verify`") from None


def summary_json(key: str, r: AblateResult, p: AblateParams, metric: str = "apl") -> dict:
    """JSON: per set and measured task, the clean and ablated metrics, Δnll and the loss rise on
    ``metric``; with cross_task, the own/other summary over measurable cells (``cross_summary``)."""

    def f(x: Tensor) -> float | None:
        return None if torch.isnan(x) else float(x)

    rise = loss_rise(r, metric)
    ok_t = detectable(r, metric)
    cells = {}
    for i, s in enumerate(r.sets):
        row = {}
        for j, t in enumerate(r.tasks):
            if torch.isnan(r.ablated["nll"][i, j]):
                continue
            row[t] = {**{m: f(r.ablated[m][i, j]) for m in METRICS},
                      "delta_nll": f(r.ablated["nll"][i, j] - r.base["nll"][j]),
                      "loss_rise": f(rise[i, j]) if bool(ok_t[j]) else "cannot detect"}
        cells[s] = {"features": r.features.get(s, {}), "measured": row}
    base = {t: {m: f(r.base[m][j]) for m in METRICS} for j, t in enumerate(r.tasks)}
    out = {"key": key, "roles": list(p.roles), "mode": p.mode, "cross_task": p.cross_task, "tasks": r.tasks,
           "sets": r.sets, "base": base, "ablated": cells, "metric": metric,
           "delta_nll": [[f(r.ablated["nll"][i, j] - r.base["nll"][j]) for j in range(len(r.tasks))]
                         for i in range(len(r.sets))],
           "cannot_detect": [t for j, t in enumerate(r.tasks) if not bool(ok_t[j])], "empty_sets": empty_sets(r)}
    if p.cross_task:
        out["summary"] = cross_summary(r, metric)
        out["own_worst_share"] = out["summary"]["own_worst_share"]
    return out


def base_loss(r: AblateResult, metric: str = "apl") -> Tensor:
    """[T] clean loss of each measured task on ``metric`` (nats): nll, or −all_pairs_logprob."""
    if metric not in LOSSES:
        raise IclError(f"unknown --metric {metric!r}; use one of {', '.join(LOSSES)}")
    return r.base["nll"] if metric == "nll" else -r.base["apl"]


def loss_rise(r: AblateResult, metric: str = "apl") -> Tensor:
    """[S, T] ablated − clean loss on ``metric`` (nats; NaN where not measured)."""
    ablated = r.ablated["nll"] if metric == "nll" else -r.ablated["apl"]
    return ablated - base_loss(r, metric)[None, :]


def detectable(r: AblateResult, metric: str = "apl") -> Tensor:
    """[T] bool: the task's clean loss is at least FLOOR_NLL, so a rise can show."""
    return base_loss(r, metric) >= FLOOR_NLL


def empty_sets(r: AblateResult) -> list[str]:
    """Sets with no feature in any dictionary (nothing was ablated: not a measurement)."""
    return [s for s in r.sets if r.features and not any(len(ids) for ids in r.features.get(s, {}).values())]


def cross_summary(r: AblateResult, metric: str = "apl") -> dict:
    """Own-task and other-task mean loss rises over the measurable cells only (SPEC §7): columns whose
    clean loss is at the floor and rows whose set is empty are listed apart and left out."""
    rise = loss_rise(r, metric)
    ok_t = detectable(r, metric)
    empty = set(empty_sets(r))
    own_cells, other_cells = [], []
    for i, s in enumerate(r.sets):
        if s in empty:
            continue
        for j, t in enumerate(r.tasks):
            v = float(rise[i, j])
            if not ok_t[j] or v != v:
                continue
            (own_cells if s == t else other_cells).append(v)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"metric": metric, "floor_nats": FLOOR_NLL, "own_mean": mean(own_cells), "other_mean": mean(other_cells),
            "n_own": len(own_cells), "n_other": len(other_cells),
            "cannot_detect": [t for j, t in enumerate(r.tasks) if not ok_t[j]], "empty_sets": sorted(empty),
            "own_worst_share": own_worst_share(r, metric)}


def own_worst_share(r: AblateResult, metric: str = "nll") -> float | None:
    """Share of measured tasks whose loss rises most when their own features are ablated (cross-task).
    Tasks at the floor of ``metric`` and empty sets take no part."""
    delta = loss_rise(r, metric)  # [S, T]
    ok_t = detectable(r, metric)
    empty = set(empty_sets(r))
    hits, n = 0, 0
    for j, t in enumerate(r.tasks):
        if t not in r.sets or t in empty or not bool(ok_t[j]) or torch.isnan(delta[:, j]).all():
            continue
        col = delta[:, j].clone()
        for i, s in enumerate(r.sets):
            if s in empty:
                col[i] = float("nan")
        col = torch.nan_to_num(col, nan=float("-inf"))
        n += 1
        hits += int(int(col.argmax()) == r.sets.index(t))
    return hits / n if n else None
