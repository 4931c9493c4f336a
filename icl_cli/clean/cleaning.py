"""Task vector cleaning (docs/METHODS.md §5; Kharlapenko et al. 2025, §3): a sparse SAE decomposition of a
task vector that keeps its effect.

For each task, with v = TV[t, l] and an SAE on resid_pre[l]:
1. θ ← the SAE's pre-activation encoding of v (input normalisation included).
2. a(θ) ← the SAE's activation of θ (ReLU for top-k SAEs, so the support can only shrink).
3. v(θ) ← decode(a(θ)) (decoder bias and output de-normalisation included).
4. loss(θ) = nll(0-shot train prompts with v(θ) added at the arrow of resid_pre[l]) + λ‖a(θ)‖₁;
   the residual below l is computed once, each step runs only blocks ≥ l.
5. Adam; stop when L0 = #{a(θ) > 0} has not reached a new minimum for ``patience`` steps (or
   has reached 0); return the θ at the minimum L0.
6. λ auto (``p.l1`` None): 0-shot validation prompts whose queries are training pairs no
   training prompt asks; a λ of ``p.l1_grid`` passes when its cleaned vector's validation nll ≤
   (1 + ``p.l1_tolerance``) × the raw vector's + ``p.l1_slack`` nats. Keep the largest passing λ:
   every task's search starts at the grid λ nearest ``p.l1_start`` and moves up while λs pass, or
   down until one passes (choose_l1), so no task's λ depends on another's. If none passes, the
   λ with the lowest validation nll.
Baselines on the same held-out prompts: 0-shot, raw TV, SAE reconstruction, gradient pursuit
with k = 5 and 20. ``detectors``: clean DV[t, l] instead, steering at the output token of a
dummy example "X -> Y" prepended to the 0-shot prompt (METHODS §6).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from icl_cli.collect.vectors import task_split
from icl_cli.core.batch import PromptBatch
from icl_cli.core.prompts import DUMMY_PAIR, Prompt, sample_prompts
from icl_cli.core.sites import HookedModel, Site, add_at
from icl_cli.core.steering import BaseCache, run_answers, scores, steered_answers
from icl_cli.core.metrics import nll
from icl_cli.core.tasks import Task
from icl_cli.core.errors import IclError
from icl_cli.clean.pursuit import pursuit_vector
from icl_cli.clean.artifact import (FORMAT_VERSION, CleanParams, CleanResult, read_h5, read_meta,  # noqa: F401 (re-exported)
                              summary_json, write_h5)

METHODS = ("zero_shot", "tv", "recon", "cleaned", "ito_5", "ito_20")


class Cleaned(NamedTuple):
    vector: Tensor  # [D]
    acts: Tensor  # [d_sae], the kept activations
    l0: int
    steps: int


def steer_mask(batch: PromptBatch, detectors: bool) -> Tensor:
    """[B, P] bool: the query arrow, or the dummy example's output token for detectors."""
    if not detectors:
        return batch.zero_shot_arrow_mask()
    out = batch.role_mask("output")
    first = out.float().argmax(-1)
    mask = torch.zeros_like(out)
    mask[torch.arange(len(batch)), first] = True
    return mask


def _prompts(pairs, queries, n: int, seed: int, detectors: bool, template: str, task: str) -> list[Prompt]:
    base = sample_prompts(pairs, n, 0, seed, template, with_answer=True, queries=queries, task_name=task)
    if detectors:
        return [Prompt([DUMMY_PAIR], p.query, template, True) for p in base]
    return base


def activation(sae) -> Callable[[Tensor], Tensor]:
    """a(θ): the SAE's own activation, ReLU for top-k (so the support can only shrink)."""
    return torch.relu if sae.cfg.arch == "topk" else sae.activate


def initial_theta(sae, v: Tensor) -> Tensor:
    """θ₀ = the pre-activation encoding of v. For a top-k SAE the entries outside its top k are
    capped at 0, so that ReLU(θ₀) is exactly its reconstruction's code and the support can only
    shrink from there (capped entries get no gradient through the ReLU)."""
    with torch.no_grad():
        pre = sae.encode_pre(v)
        if sae.cfg.arch == "topk":
            keep = torch.zeros_like(pre, dtype=torch.bool)
            keep[pre.topk(sae.cfg.k).indices] = True
            pre = torch.where(keep, pre, pre.clamp(max=0))
    return pre.detach().clone()


def clean_step(hm: HookedModel, sae, cache: BaseCache, layer: int, theta: Tensor, l1: float, mask: Tensor,
               act: Callable[[Tensor], Tensor]) -> Tensor:
    """Step 4's loss (0-d, differentiable in θ [d_sae]): nll of the training prompts steered by
    decode(a(θ)) at ``mask`` of resid_pre[layer], + l1·‖a(θ)‖₁; blocks < layer are not run."""
    a = act(theta)
    # logits only where answers are predicted (the model's final norm, unembedding and soft-cap
    # at those positions): unembedding every position was close to half a step at Gemma-1 2B's sizes
    logits, small = run_answers(hm, cache.batch, {Site("resid_pre", layer): add_at(sae.decode(a), mask)}, layer,
                                cache.resid[layer], grad=True)  # [B, n_first, V]
    return nll(logits, small) + l1 * a.abs().sum()


def clean_vector(hm: HookedModel, sae, cache: BaseCache, layer: int, v: Tensor, p: CleanParams, l1: float,
                 mask: Tensor, tick: Callable[[str], None] | None = None) -> Cleaned:
    """Steps 1-5 above for one vector; returns the θ with the minimum L0 seen. ``tick(text)``, when
    given, hears after every step where the optimisation is (the command layer shows it at most
    every few seconds)."""
    act = activation(sae)
    sae.requires_grad_(False)  # only θ is optimised
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    theta = initial_theta(sae, v.to(dev, dt)).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=p.lr)
    best = (int((act(theta) > 0).sum()), theta.detach().clone(), 0)
    since = 0
    step = 0
    for step in range(1, p.max_steps + 1):
        loss = clean_step(hm, sae, cache, layer, theta, l1, mask, act)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # one device sync per step: the loss check and the new L0 together
            finite, l0 = torch.stack([torch.isfinite(loss).long(), (act(theta) > 0).sum()]).tolist()
        if not finite:
            raise IclError(f"the cleaning loss became {loss.item()} at step {step}; lower --lr or run in float32 (--dtype float32)")
        if tick is not None:
            tick(f"λ {l1:g} step {step}/{p.max_steps} L0 {l0} (min {min(l0, best[0])})")
        if l0 < best[0]:
            best, since = (l0, theta.detach().clone(), step), 0
            if l0 == 0:  # nothing is sparser: the returned θ cannot change any more
                break
        else:
            since += 1
            if since >= p.patience:
                break
    with torch.no_grad():
        a = act(best[1])
        return Cleaned(sae.decode(a).detach(), a.detach(), best[0], step)


def validation_queries(train: Sequence[tuple[str, str]], used: Sequence[Prompt]) -> list[tuple[str, str]]:
    """The training pairs that no prompt of ``used`` asks: queries for --l1 auto's validation."""
    asked = {p.query[0] for p in used}
    rest = [pair for pair in train if pair[0] not in asked]
    if not rest:
        raise IclError(f"every training pair is a training query ({len(train)} pairs, --n-train {len(used)}), so --l1 auto "
                       "has no validation prompts; lower --n-train or pass an explicit --l1")
    return rest


def choose_l1(hm: HookedModel, sae, cache_tr: BaseCache, cache_val: BaseCache, layer: int, v: Tensor, p: CleanParams,
              mask_tr: Tensor, mask_val: Tensor, start: float | None = None,
              tick: Callable[[str], None] | None = None) -> tuple[float, Cleaned, dict]:
    """Step 6 above: (λ, its cleaned vector, the record of every λ tried, in the order tried).

    From ``start`` (a λ of the grid; default its largest): while the λ passes, try the next
    larger one; once one fails, try smaller ones until one passes. So it returns a passing λ whose
    next larger λ fails, which is the largest passing λ whenever passing is monotone in λ (a
    smaller λ never does worse), and exactly the largest passing one when ``start`` is the top.
    """
    def val_nll(vec: Tensor) -> float:
        with torch.no_grad():
            return scores(*steered_answers(hm, cache_val, layer, vec, mask=mask_val)).nll

    base = val_nll(v)
    limit = base * (1 + p.l1_tolerance) + p.l1_slack
    grid = p.l1_grid  # largest first
    tried: dict[str, list] = {"l1": [], "l0": [], "val_nll": [], "steps": []}
    done: dict[int, tuple[Cleaned, float]] = {}

    def passes(i: int) -> bool:
        if i not in done:
            c = clean_vector(hm, sae, cache_tr, layer, v, p, grid[i], mask_tr, tick)
            done[i] = (c, val_nll(c.vector))
            for k, x in (("l1", grid[i]), ("l0", c.l0), ("val_nll", done[i][1]), ("steps", c.steps)):
                tried[k].append(x)
        return done[i][1] <= limit

    i = grid.index(start) if start in grid else 0
    if passes(i):
        while i > 0 and passes(i - 1):
            i -= 1
        chosen, passed = i, True
    else:
        while i + 1 < len(grid) and not passes(i + 1):
            i += 1
        passed = i + 1 < len(grid)
        chosen = i + 1 if passed else min(done, key=lambda j: (done[j][1], j))
    record = {**tried, "val_nll_tv": base, "limit": limit, "passed": passed}
    return grid[chosen], done[chosen][0], record


def clean_task(hm: HookedModel, tokenizer, sae, task: Task, layer: int, v: Tensor, p: CleanParams,
               split: tuple[int, int], template: str = "paper", n_first: int = 2, device=None,
               tick: Callable[[str], None] | None = None) -> CleanResult:
    """Clean one task's vector and score every method on held-out prompts.

    split = (n_eval, seed) of the collect step, so the held-out queries are the ones it held out.
    ``tick``: where each optimisation is, after every step (clean_vector).
    """
    train, heldout = task_split(task, *split)
    tr = _prompts(train, train, p.n_train, p.seed + 3, p.detectors, template, task.name)
    ho = _prompts(task.pairs, heldout, split[0], split[1] + 1, p.detectors, template, task.name)
    cache_tr = BaseCache.build(hm, tokenizer, tr, [layer], n_first, device)
    cache_ho = BaseCache.build(hm, tokenizer, ho, [layer], n_first, device)
    mask_tr, mask_ho = steer_mask(cache_tr.batch, p.detectors), steer_mask(cache_ho.batch, p.detectors)

    if p.auto:
        val = _prompts(train, validation_queries(train, tr), p.n_val, p.seed + 4, p.detectors, template, task.name)
        cache_val = BaseCache.build(hm, tokenizer, val, [layer], n_first, device)
        l1, cleaned, auto = choose_l1(hm, sae, cache_tr, cache_val, layer, v, p, mask_tr,
                                      steer_mask(cache_val.batch, p.detectors), start=p.l1_grid[p.start_index], tick=tick)
    else:
        l1, auto = p.l1, {}
        cleaned = clean_vector(hm, sae, cache_tr, layer, v, p, l1, mask_tr, tick)
    with torch.no_grad():
        recon_acts = sae.encode(v.to(sae.W_dec.device, sae.W_dec.dtype))
        vectors = {"zero_shot": None, "tv": v, "recon": sae.decode(recon_acts), "cleaned": cleaned.vector}
        l0 = {"recon": int((recon_acts > 0).sum()), "cleaned": cleaned.l0}
        for k in p.ito_k:
            vectors[f"ito_{k}"], l0[f"ito_{k}"] = pursuit_vector(v.to(sae.W_dec.device), sae, k)
        held = {m: scores(*steered_answers(hm, cache_ho, layer, vec, mask=mask_ho))
                for m, vec in vectors.items()}
    kept = torch.nonzero(cleaned.acts > 0).flatten()
    order = kept[torch.argsort(cleaned.acts[kept], descending=True)]
    result = CleanResult(order.tolist(), cleaned.acts[order].tolist(), l0,
                         {m: s.nll for m, s in held.items()}, {m: s.acc for m, s in held.items()}, cleaned.steps,
                         l1=l1, auto=auto)
    if p.sweep_l1:
        result.sweep = {"l1": list(p.sweep_l1), "l0": [], "nll": []}
        for lam in p.sweep_l1:
            c = clean_vector(hm, sae, cache_tr, layer, v, p, lam, mask_tr, tick)
            with torch.no_grad():
                s = scores(*steered_answers(hm, cache_ho, layer, c.vector, mask=mask_ho))
            result.sweep["l0"].append(c.l0)
            result.sweep["nll"].append(s.nll)
    return result
