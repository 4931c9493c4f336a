"""Steering with single SAE features (SPEC §6; Kharlapenko et al. 2025, §4): the executor heatmap,
detector steering and negative steering.

    icl steer --clean CLEAN_REF                          # executor heatmap at the cleaning layer l
    icl steer --clean CLEAN_DETECTORS_REF --mode detector
    icl steer --clean CLEAN_REF --mode negative

1. The direction of feature f is u_f = W_dec[f] / ‖W_dec[f]‖ (W_dec in model space, the SAE's
   normalisation folded in).
2. Executor heatmap: for each task t, held-out 0-shot prompts (the queries that ``collect`` held
   out, sampled exactly as ``clean`` samples its held-out prompts). base = their nll unsteered;
   cell (t, f) = their nll with s·u_f added to resid_pre[l] at the query's arrow; the effect is the
   relative loss decrease (base − min(nll, base)) / base.
   Speed: the residual below l is computed once per task (``BaseCache``) and the cells of one task
   run in batched passes of c features × B prompts: the cached residual is repeated c times and
   row k·B + b carries s·u_{f_k}; only blocks ≥ l run.
3. Detector heatmap: the same with the dummy example "X -> Y" prepended to the 0-shot prompt and
   s·u_f added at its output token "Y", at the detector SAE's layer (paper: l − 1, s = 25).
4. Executors (detectors) of t (SPEC §8): f with effect[t, f] ≥ ``min_effect`` and
   effect[t', f] ≤ ``max_other`` · effect[t, f] for every task t' of another task group (rule
   ``group``, the default: a feature shared by related tasks, such as one executor of en→es,
   en→fr and en→it, is allowed, as in the paper's own list), or for every other task (rule
   ``strict``: with max_other < 1 a feature then belongs to at most one task). The floor
   ``min_effect`` is on the relative loss decrease itself, not on the row-normalised cell, so a
   task that no feature really helps gets no executor instead of its least bad one.
5. Negative steering (SPEC §6, the paper's per-feature form): for each feature f of the union of
   the tasks' sets (kept features, executors or given ids) and each task t, s·u_f is subtracted
   at every arrow of held-out few-shot prompts (sampled as ``collect`` samples its few-shot
   evaluation), for each s of a sweep (paper: logspace 1…31.6). Scored at every arrow, as the
   paper did: nll and accuracy of the next token (each pair's first answer token), averaged
   over the pairs of a prompt, then over prompts. Result: feature × task × scale.

HDF5 layout (``steer.h5``)::

    attrs     mode, layer, scale (executor/detector), model, min_effect, max_other
    tasks [T] utf-8    features [F] int64
    effect [T,F] nll [T,F] acc [T,F] float32, base_nll [T] base_acc [T]       (executor/detector)
    scales [S] nll [T,F,S] acc [T,F,S] float32, base_nll [T] base_acc [T]     (negative; every arrow)
    kept/<task>, selected/<task> int64

Reading and writing it: :mod:`icl_cli.steer.artifact` (re-exported here: ``read_h5``, ``write_h5``,
``SteerResult``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from icl_cli.clean.cleaning import _prompts as heldout_prompts
from icl_cli.clean.cleaning import steer_mask
from icl_cli.collect.vectors import task_split
from icl_cli.core.batch import PromptBatch
from icl_cli.core.metrics import correct, nll_per_prompt
from icl_cli.core.prompts import sample_prompts
from icl_cli.core.sites import HookedModel, Site, add_at
from icl_cli.core.steering import BaseCache, answer_logits, run_answers, scores, steered_answers  # noqa: F401 (answer_logits re-exported)
from icl_cli.core.tasks import Task
from icl_cli.core.errors import IclError
from icl_cli.steer.artifact import (Cells, SteerResult, load_cells, merge_rows, read_h5, save_cells,  # noqa: F401 (re-exported)
                              task_rows, write_h5)

FORMAT_VERSION = 2
"""2: the executor rule compares tasks of other groups (``rule``); negative steering is per feature."""
MODES = ("executor", "detector", "negative")
RULES = ("group", "strict")
"""group: effects on tasks of other task groups count against a feature; strict: every other task's."""
DEFAULT_SCALE = {"executor": 15.0, "detector": 25.0}
"""Paper: executors s = 15 at layer l, detectors s = 25 at layer l − 1."""
NEGATIVE_SCALES = tuple(round(10 ** (k / 4), 4) for k in range(7))
"""1, 1.78, 3.16, 5.62, 10, 17.8, 31.6: the paper's logspace from 1 to 31.6."""


@dataclass
class SteerParams:
    mode: str = "executor"
    """executor | detector | negative."""
    scale: float | None = None
    """s of the heatmap (default per mode: 15 executor, 25 detector)."""
    scales: tuple[float, ...] = NEGATIVE_SCALES
    """Negative mode: the scales swept."""
    n_prompts: int = 32
    """Held-out prompts per task (paper: 32)."""
    min_effect: float = 0.2
    """Executor rule: at least this relative loss decrease on the feature's own task."""
    max_other: float = 0.5
    """Executor rule: on the tasks compared (see ``rule``) at most this fraction of its own-task effect."""
    rule: str = "group"
    """Executor rule: group (compare with tasks of other task groups, the paper's) or strict (every other task)."""
    batch_size: int = 256
    """Prompt rows per batched pass (features × prompts); speed only."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise IclError(f"unknown --mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.rule not in RULES:
            raise IclError(f"unknown --rule {self.rule!r}; use one of {', '.join(RULES)}")
        if self.scale is not None and not math.isfinite(self.scale):
            raise IclError(f"--scale must be a finite number, got {self.scale}")
        if self.scale is None and self.mode != "negative":
            self.scale = DEFAULT_SCALE[self.mode]
        if not self.scales or not all(math.isfinite(s) for s in self.scales):
            raise IclError(f"--scales must be finite numbers, got {','.join(map(str, self.scales)) or 'nothing'}")
        if not (math.isfinite(self.min_effect) and math.isfinite(self.max_other)) or self.max_other < 0:
            raise IclError("--min-effect must be a finite number and --max-other a finite number ≥ 0")
        if self.n_prompts < 1 or self.batch_size < 1:
            raise IclError("--n-prompts and --batch-size must be ≥ 1")


class PromptSource(NamedTuple):
    """How the collect step split and sampled a task (so held-out prompts match collect and clean)."""

    n_eval: int
    seed: int
    template: str = "paper"
    n_first: int = 2
    n_shot: int = 19

    @classmethod
    def from_collect(cls, cp: dict) -> "PromptSource":
        return cls(cp["n_eval"], cp["seed"], cp["template"], cp["n_first"], cp["n_shot"])


# ---------------------------------------------------------------- directions and batched passes

def unit_directions(sae, features: Sequence[int]) -> Tensor:
    """[F, D] rows u_f = W_dec[f] / ‖W_dec[f]‖; IclError for an id outside the SAE."""
    width = sae.cfg.d_sae
    bad = [f for f in features if not 0 <= int(f) < width]
    if bad:
        raise IclError(f"feature id {bad[0]} is beyond the SAE's width ({width} features, ids 0-{width - 1}); "
                       f"pass ids below {width}")
    w = sae.W_dec.detach()[torch.as_tensor(list(features), dtype=torch.long, device=sae.W_dec.device)].float()
    norm = w.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        dead = [int(f) for f, n in zip(features, norm.flatten()) if n == 0]
        raise IclError(f"feature {dead[0]} has a zero decoder direction, so it cannot steer; leave it out")
    return w / norm


def repeat_batch(batch: PromptBatch, c: int) -> PromptBatch:
    """The batch stacked c times along the batch axis (row k·B + b = prompt b)."""
    return PromptBatch(**{f.name: getattr(batch, f.name).repeat(c, *[1] * (getattr(batch, f.name).dim() - 1))
                          for f in fields(batch)})


def arrow_scores(hm: HookedModel, b: PromptBatch, edit: dict | None, start_at: int, start_resid: Tensor) -> tuple[Tensor, Tensor]:
    """(nll, acc) per prompt ([B] each) of the next token at every arrow: the log-probability of each
    pair's first answer token at the position that predicts it, averaged over the prompt's pairs."""
    from icl_cli.core.steering import answer_logits

    last = Site("resid_post", hm.n_layers - 1)
    out = hm.run(b.input_ids, b.attention_mask, read=[last], edit=edit, stop_after=last.layer, start_at=start_at,
                 start_resid=start_resid)
    pos, ids = b.pair_answer_pos, b.pair_answer_ids  # [B, n_pairs]
    logits = answer_logits(hm, out.acts[last], pos).float()  # [B, n_pairs, V]
    valid = (pos >= 0).float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None].to(logits.device))[..., 0]
    hit = (logits.argmax(-1) == ids.to(logits.device)).float()
    n = valid.sum(1).clamp(min=1)
    return -(logp * valid).sum(1) / n, (hit * valid).sum(1) / n


@torch.no_grad()
def batched_scores(hm: HookedModel, cache: BaseCache, layer: int, vectors: Tensor, mask: Tensor,
                   batch_size: int = 256, every_arrow: bool = False) -> tuple[Tensor, Tensor]:
    """nll and acc ([K] each, means over the B cached prompts) with vectors[k] ([K, D]) added to
    resid_pre[layer] at ``mask`` ([B, P] bool), K edits in passes of ⌊batch_size / B⌋ of them.
    Scored at the query's answer tokens, or with ``every_arrow`` at every pair (``arrow_scores``)."""
    B = len(cache.batch)
    per = max(1, batch_size // B)
    nlls, accs = [], []
    for i in range(0, len(vectors), per):
        v = vectors[i : i + per]
        c = len(v)
        big = repeat_batch(cache.batch, c)
        rows = v.repeat_interleave(B, dim=0)  # [c·B, D]: row k·B + b gets edit k
        edit = {Site("resid_pre", layer): add_at(rows, mask.repeat(c, 1))}
        resid = cache.resid[layer].repeat(c, 1, 1)
        if every_arrow:
            nll, acc = arrow_scores(hm, big, edit, layer, resid)
            nlls.append(nll.view(c, B).mean(1).cpu())
            accs.append(acc.view(c, B).mean(1).cpu())
            continue
        logits, small = run_answers(hm, big, edit, layer, resid)  # [c·B, n_first, V]
        nlls.append(nll_per_prompt(logits, small).view(c, B).mean(1).float().cpu())
        accs.append(correct(logits, small).float().view(c, B).mean(1).cpu())
    return torch.cat(nlls), torch.cat(accs)


# ---------------------------------------------------------------- one task

def heatmap_prompts(task: Task, n_prompts: int, src: PromptSource, detectors: bool):
    """Held-out 0-shot prompts (with the dummy example for detectors): clean's held-out prompts."""
    _, heldout = task_split(task, src.n_eval, src.seed)
    return heldout_prompts(task.pairs, heldout, n_prompts, src.seed + 1, detectors, src.template, task.name)


def negative_prompts(task: Task, n_prompts: int, src: PromptSource):
    """Held-out few-shot prompts, sampled like collect's few-shot evaluation."""
    _, heldout = task_split(task, src.n_eval, src.seed)
    return sample_prompts(task.pairs, n_prompts, src.n_shot, src.seed + 2, src.template, queries=heldout,
                          task_name=task.name)


@torch.no_grad()
def heatmap_task(hm: HookedModel, tokenizer, task: Task, layer: int, directions: Tensor, p: SteerParams,
                 src: PromptSource, device=None) -> Cells:
    """One task's row of the executor (or detector) heatmap: nll/acc per feature direction [F, D]."""
    detectors = p.mode == "detector"
    cache = BaseCache.build(hm, tokenizer, heatmap_prompts(task, p.n_prompts, src, detectors), [layer], src.n_first, device)
    base = scores(*steered_answers(hm, cache, layer, None))
    nll, acc = batched_scores(hm, cache, layer, p.scale * directions, steer_mask(cache.batch, detectors), p.batch_size)
    return Cells(nll, acc, base.nll, base.acc)


@torch.no_grad()
def negative_task(hm: HookedModel, tokenizer, task: Task, layer: int, directions: Tensor, p: SteerParams,
                  src: PromptSource, device=None) -> Cells:
    """nll/acc [F, S]: −s·u_f (rows u_f of ``directions`` [F, D], unit) subtracted at every arrow, for
    each feature and each scale of ``p.scales``, scored at every arrow (rule 5 of the module docstring)."""
    cache = BaseCache.build(hm, tokenizer, negative_prompts(task, p.n_prompts, src), [layer], src.n_first, device)
    nll0, acc0 = arrow_scores(hm, cache.batch, None, layer, cache.resid[layer])
    F, S = len(directions), len(p.scales)
    if F == 0:
        return Cells(torch.zeros(0, S), torch.zeros(0, S), float(nll0.mean()), float(acc0.mean()))
    scales = torch.tensor(p.scales, dtype=directions.dtype, device=directions.device)
    vectors = -(directions[:, None, :] * scales[None, :, None]).reshape(F * S, -1)  # row f·S + s
    nll, acc = batched_scores(hm, cache, layer, vectors, cache.batch.role_mask("arrow"), p.batch_size, every_arrow=True)
    return Cells(nll.view(F, S), acc.view(F, S), float(nll0.mean()), float(acc0.mean()))


# ---------------------------------------------------------------- the rule and the summary figures

def relative_effect(nll: Tensor, base_nll: Tensor) -> Tensor:
    """[T, F] (base − min(nll, base)) / base (SPEC §6); 0 where base is 0."""
    base = base_nll[:, None].float()
    dec = base - torch.minimum(nll.float(), base)
    return torch.where(base > 0, dec / base.clamp(min=1e-12), torch.zeros_like(dec))


def select_executors(effect: Tensor, tasks: Sequence[str], features: Sequence[int], min_effect: float,
                     max_other: float, groups: Mapping[str, str] | None = None) -> dict[str, list[int]]:
    """Per task, the features f with effect[t, f] ≥ min_effect and effect[t', f] ≤ max_other·effect[t, f]
    for every compared task t' (rule 4 of the module docstring), by decreasing effect on t.

    groups: task -> task group; the compared tasks are those of other groups (rule ``group``).
    None: every other task (rule ``strict``)."""
    out = {}
    T = len(tasks)
    for i, t in enumerate(tasks):
        own = effect[i]
        compared = [j for j in range(T) if j != i and (groups is None or groups[tasks[j]] != groups[t])]
        worst = effect[compared].max(0).values if compared else torch.zeros_like(own)
        ok = (own >= min_effect) & (own > 0) & (worst <= max_other * own)
        idx = torch.nonzero(ok).flatten()
        idx = idx[torch.argsort(own[idx], descending=True)]
        out[t] = [int(features[j]) for j in idx]
    return out


class Specificity(NamedTuple):
    share: float
    """Share of tasks whose best feature lowers that task's loss more than any other task's."""
    best: list[int]
    """Per task, the index (into features) of the feature with the largest effect on it."""
    specific: list[bool]


def specificity(effect: Tensor) -> Specificity:
    """Executor specificity of an effect matrix [T, F] (T ≥ 2): a task's best executor is its row's
    argmax; the task counts when that feature's effect on it is > 0 and strictly larger than on
    every other task."""
    T = effect.shape[0]
    best = effect.argmax(1)
    spec = []
    for i in range(T):
        col = effect[:, best[i]]
        others = torch.cat([col[:i], col[i + 1 :]])
        spec.append(bool(col[i] > 0 and (len(others) == 0 or col[i] > others.max())))
    return Specificity(sum(spec) / max(T, 1), best.tolist(), spec)


def normalise_rows(effect: Tensor, floor: float = 0.2) -> Tensor:
    """Each row divided by its max, cells under ``floor`` set to 0 (the paper's display)."""
    m = effect.max(1, keepdim=True).values
    out = torch.where(m > 0, effect / m.clamp(min=1e-12), torch.zeros_like(effect))
    return torch.where(out < floor, torch.zeros_like(out), out)


# ---------------------------------------------------------------- running every task

def run_steer(hm: HookedModel, tokenizer, tasks: Sequence[Task], layer: int, sae, p: SteerParams,
              src: PromptSource, features: Sequence[int], kept: dict[str, list[int]],
              task_features: dict[str, list[int]] | None = None, model: str = "",
              progress: Callable[[str], None] | None = None, work_dir=None, device=None) -> SteerResult:
    """Every task in turn. Each of ``features`` is steered on every task (negative mode: subtracted
    at every arrow over the scale sweep); ``task_features`` records which task brought which feature. With ``work_dir`` finished tasks are kept and skipped on a rerun.
    Each task's row depends on that task alone; the cross-task parts come from ``steer_result``."""
    negative = p.mode == "negative"
    dirs = unit_directions(sae, features) if features else torch.zeros(0, sae.cfg.d_out)
    rows = []
    for i, task in enumerate(tasks):
        if progress:
            progress(task.name)
        part = work_dir / f"task{i}.json" if work_dir is not None else None
        done = load_cells(part)
        if done is None:
            if negative:
                done = negative_task(hm, tokenizer, task, layer, dirs, p, src, device)
            else:
                done = heatmap_task(hm, tokenizer, task, layer, dirs, p, src, device)
            save_cells(done, part)
        rows.append(done)
    return steer_result(p, layer, model, [t.name for t in tasks], features, rows, kept, task_features,
                        {t.name: t.group for t in tasks})


def steer_result(p: SteerParams, layer: int, model: str, names: Sequence[str], features: Sequence[int],
                 rows: Sequence[Cells], kept: dict[str, list[int]],
                 task_features: dict[str, list[int]] | None = None,
                 groups: Mapping[str, str] | None = None) -> SteerResult:
    """The SteerResult of per-task rows (in ``names`` order): stacked nll/acc, the relative effect and
    the executors by the rule (which compares tasks), or negative mode's scales and feature sets."""
    names = list(names)
    nll = torch.stack([r.nll for r in rows]) if rows else torch.zeros(0, 0)
    res = SteerResult(p.mode, layer, model, names, list(features), nll, torch.stack([r.acc for r in rows]),
                      torch.tensor([r.base_nll for r in rows]), torch.tensor([r.base_acc for r in rows]),
                      kept={t: list(kept.get(t, [])) for t in names}, min_effect=p.min_effect, max_other=p.max_other)
    if p.mode == "negative":
        res.scales = torch.tensor(p.scales, dtype=torch.float32)
        res.selected = {t: list(task_features[t]) for t in names}
    else:
        res.scale = p.scale
        res.effect = relative_effect(res.nll, res.base_nll)
        if p.rule == "group":  # a task outside the built-in groups is a group of its own
            from icl_cli.core.tasks import GROUP_OF

            groups = {n: (groups or {}).get(n) or GROUP_OF.get(n, n) for n in names}
        res.selected = select_executors(res.effect, names, features, p.min_effect, p.max_other,
                                        groups if p.rule == "group" else None)
        res.rule = p.rule
    return res


SHOWN_SCALE = 10.0
"""The scale at which the negative feature × task matrix is shown (the sweep's nearest one)."""


def shown_scale(r: SteerResult, scale: float = SHOWN_SCALE) -> float:
    """The scale of the sweep nearest to ``scale`` (log distance)."""
    s = r.scales.double()
    return float(s[(s.log() - math.log(scale)).abs().argmin()])


def negative_drop(r: SteerResult, scale: float) -> Tensor:
    """[F, T] accuracy drop at every arrow when feature f is subtracted at ``scale`` on task t:
    base_acc[t] − acc[t, f, s] (positive: the feature helped the task)."""
    j = int((r.scales.double() - scale).abs().argmin())
    return (r.base_acc[:, None] - r.acc[:, :, j]).T.float()


def summary_json(key: str, r: SteerResult, normalise: bool = False) -> dict:
    """The --json document: key, tasks, features, effect, executors (or detectors), and the rest."""
    out = {"key": key, "mode": r.mode, "layer": r.layer, "model": r.model, "tasks": r.tasks}
    if r.mode == "negative":
        s = shown_scale(r)
        drop = negative_drop(r, s)
        out.update(scales=r.scales.tolist(), nll=r.nll.tolist(), acc=r.acc.tolist(), base_nll=r.base_nll.tolist(),
                   base_acc=r.base_acc.tolist(), features=r.features, selected=r.selected, kept=r.kept,
                   shown_scale=s, acc_drop={str(f): dict(zip(r.tasks, drop[k].tolist())) for k, f in enumerate(r.features)})
        return out
    out.update(scale=r.scale, features=r.features, effect=r.effect.tolist())
    out["detectors" if r.mode == "detector" else "executors"] = r.selected
    out.update(nll=r.nll.tolist(), acc=r.acc.tolist(), base_nll=r.base_nll.tolist(), base_acc=r.base_acc.tolist(),
               kept=r.kept, rule={"min_effect": r.min_effect, "max_other": r.max_other})
    if normalise:
        out["effect_normalised"] = normalise_rows(r.effect).tolist()
    if len(r.tasks) >= 2 and r.features:
        s = specificity(r.effect)
        out["specificity"] = {"share": s.share, "best": {t: r.features[b] for t, b in zip(r.tasks, s.best)},
                              "specific": dict(zip(r.tasks, s.specific))}
    return out
