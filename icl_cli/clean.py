"""Task vector cleaning (SPEC §5; Kharlapenko et al. 2025, §3): a sparse SAE decomposition of a
task vector that keeps its effect.

For each task, with v = TV[t, l] and an SAE on resid_pre[l]:
1. θ ← the SAE's pre-activation encoding of v (input normalisation included).
2. a(θ) ← the SAE's activation of θ (ReLU for top-k SAEs, so the support can only shrink).
3. v(θ) ← decode(a(θ)) (decoder bias and output de-normalisation included).
4. loss(θ) = nll(0-shot train prompts with v(θ) added at the arrow of resid_pre[l]) + λ‖a(θ)‖₁;
   the residual below l is computed once, each step runs only blocks ≥ l.
5. Adam; stop when L0 = #{a(θ) > 0} has not reached a new minimum for ``patience`` steps;
   return the θ at the minimum L0.
Baselines on the same held-out prompts: 0-shot, raw TV, SAE reconstruction, gradient pursuit
with k = 5 and 20. ``detectors``: clean DV[t, l] instead, steering at the output token of a
dummy example "X -> Y" prepended to the 0-shot prompt (SPEC §6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from icl_cli.collect import task_split
from icl_cli.core.batch import PromptBatch
from icl_cli.core.prompts import DUMMY_PAIR, Prompt, sample_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.steering import BaseCache, scores, steered_logits
from icl_cli.core.metrics import nll
from icl_cli.core.tasks import Task
from icl_cli.errors import IclError
from icl_cli.pursuit import pursuit_vector

FORMAT_VERSION = 1
METHODS = ("zero_shot", "tv", "recon", "cleaned", "ito_5", "ito_20")


@dataclass
class CleanParams:
    l1: float = 0.05
    """λ of the L1 penalty on the SAE activations (paper: 0.05)."""
    lr: float = 0.01
    """Adam learning rate (paper: 1e-2)."""
    max_steps: int = 1000
    """At most this many steps per task (paper: 1000)."""
    patience: int = 200
    """Stop when L0 has not reached a new minimum for this many steps (paper: 200)."""
    n_train: int = 24
    """0-shot training prompts per task (paper: 24)."""
    ito_k: tuple[int, ...] = (5, 20)
    """Gradient pursuit baselines with these k."""
    sweep_l1: tuple[float, ...] = ()
    """Also clean with each of these λ (held-out nll and L0 per λ)."""
    detectors: bool = False
    """Clean the detector vectors (output tokens) instead of the task vectors."""
    seed: int = 0
    """Seed of the training prompts."""

    def __post_init__(self) -> None:
        if self.l1 < 0 or any(lam < 0 for lam in self.sweep_l1) or self.lr <= 0 or self.max_steps < 1 or self.patience < 1 or self.n_train < 1:
            raise IclError("need --l1 and --sweep-l1 values ≥ 0, --lr > 0, --max-steps ≥ 1, --patience ≥ 1 and --n-train ≥ 1")


class Cleaned(NamedTuple):
    vector: Tensor  # [D]
    acts: Tensor  # [d_sae], the kept activations
    l0: int
    steps: int


@dataclass
class CleanResult:
    features: list[int]
    weights: list[float]
    l0: dict[str, int]
    nll: dict[str, float]
    acc: dict[str, float]
    steps: int
    sweep: dict[str, list[float]] = field(default_factory=dict)  # l1, l0, nll

    def save(self, path) -> None:
        """Write this result as JSON, atomically (partial results of an interrupted run)."""
        import json
        import os
        from dataclasses import asdict

        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(asdict(self), fh)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "CleanResult | None":
        import json

        try:
            with open(path) as fh:
                return cls(**json.load(fh))
        except (OSError, ValueError, TypeError):
            return None

    @property
    def l0_fraction(self) -> float:
        return self.l0["cleaned"] / max(self.l0["recon"], 1)

    def loss_delta(self, method: str = "cleaned") -> float:
        """(nll_TV − nll_method) / nll_zero-shot: > 0 when the method beats the raw TV."""
        return (self.nll["tv"] - self.nll[method]) / max(self.nll["zero_shot"], 1e-9)


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


def clean_vector(hm: HookedModel, sae, cache: BaseCache, layer: int, v: Tensor, p: CleanParams, l1: float,
                 mask: Tensor) -> Cleaned:
    """Steps 1-5 above for one vector; returns the θ with the minimum L0 seen."""
    act = activation(sae)
    sae.requires_grad_(False)  # only θ is optimised
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    theta = initial_theta(sae, v.to(dev, dt)).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=p.lr)
    best = (int((act(theta) > 0).sum()), theta.detach().clone(), 0)
    since = 0
    step = 0
    for step in range(1, p.max_steps + 1):
        a = act(theta)
        vec = sae.decode(a)
        logits = steered_logits(hm, cache, layer, vec, grad=True, mask=mask)
        loss = nll(logits, cache.batch) + l1 * a.abs().sum()
        if not torch.isfinite(loss):
            raise IclError(f"the cleaning loss became {loss.item()} at step {step}; lower --lr or run in float32 (--dtype float32)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            l0 = int((act(theta) > 0).sum())
        if l0 < best[0]:
            best, since = (l0, theta.detach().clone(), step), 0
        else:
            since += 1
            if since >= p.patience:
                break
    with torch.no_grad():
        a = act(best[1])
        return Cleaned(sae.decode(a).detach(), a.detach(), best[0], step)


def clean_task(hm: HookedModel, tokenizer, sae, task: Task, layer: int, v: Tensor, p: CleanParams,
               split: tuple[int, int], template: str = "paper", n_first: int = 2, device=None) -> CleanResult:
    """Clean one task's vector and score every method on held-out prompts.

    split = (n_eval, seed) of the collect step, so the held-out queries are the ones it held out.
    """
    train, heldout = task_split(task, *split)
    tr = _prompts(train, train, p.n_train, p.seed + 3, p.detectors, template, task.name)
    ho = _prompts(task.pairs, heldout, split[0], split[1] + 1, p.detectors, template, task.name)
    cache_tr = BaseCache.build(hm, tokenizer, tr, [layer], n_first, device)
    cache_ho = BaseCache.build(hm, tokenizer, ho, [layer], n_first, device)
    mask_tr, mask_ho = steer_mask(cache_tr.batch, p.detectors), steer_mask(cache_ho.batch, p.detectors)

    cleaned = clean_vector(hm, sae, cache_tr, layer, v, p, p.l1, mask_tr)
    with torch.no_grad():
        recon_acts = sae.encode(v.to(sae.W_dec.device, sae.W_dec.dtype))
        vectors = {"zero_shot": None, "tv": v, "recon": sae.decode(recon_acts), "cleaned": cleaned.vector}
        l0 = {"recon": int((recon_acts > 0).sum()), "cleaned": cleaned.l0}
        for k in p.ito_k:
            vectors[f"ito_{k}"], l0[f"ito_{k}"] = pursuit_vector(v.to(sae.W_dec.device), sae, k)
        held = {m: scores(steered_logits(hm, cache_ho, layer, vec, mask=mask_ho), cache_ho.batch)
                for m, vec in vectors.items()}
    kept = torch.nonzero(cleaned.acts > 0).flatten()
    order = kept[torch.argsort(cleaned.acts[kept], descending=True)]
    result = CleanResult(order.tolist(), cleaned.acts[order].tolist(), l0,
                         {m: s.nll for m, s in held.items()}, {m: s.acc for m, s in held.items()}, cleaned.steps)
    if p.sweep_l1:
        result.sweep = {"l1": list(p.sweep_l1), "l0": [], "nll": []}
        for lam in p.sweep_l1:
            c = clean_vector(hm, sae, cache_tr, layer, v, p, lam, mask_tr)
            with torch.no_grad():
                s = scores(steered_logits(hm, cache_ho, layer, c.vector, mask=mask_ho), cache_ho.batch)
            result.sweep["l0"].append(c.l0)
            result.sweep["nll"].append(s.nll)
    return result


def write_h5(f, layer: int, results: dict[str, CleanResult]) -> None:
    """/tasks/<t>/{features, weights, l0/<m>, nll/<m>, acc/<m>, sweep/*}; attrs layer, steps."""
    f.attrs["layer"] = layer
    for name, r in results.items():
        g = f.create_group(f"tasks/{name}")
        g.create_dataset("features", data=torch.tensor(r.features, dtype=torch.long).numpy())
        g.create_dataset("weights", data=torch.tensor(r.weights, dtype=torch.float32).numpy())
        for group, values in (("l0", r.l0), ("nll", r.nll), ("acc", r.acc)):
            for m, v in values.items():
                g.create_dataset(f"{group}/{m}", data=v)
        for k, v in r.sweep.items():
            g.create_dataset(f"sweep/{k}", data=v)
        g.attrs["steps"] = r.steps


def read_h5(path) -> tuple[int, dict[str, CleanResult]]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            layer = int(f.attrs["layer"])
            results = {}
            for name, g in f["tasks"].items():
                get = lambda grp, cast: {m: cast(v[()]) for m, v in g[grp].items()}  # noqa: E731
                sweep = {k: v[()].tolist() for k, v in g["sweep"].items()} if "sweep" in g else {}
                results[name] = CleanResult(g["features"][()].tolist(), g["weights"][()].tolist(), get("l0", int),
                                            get("nll", float), get("acc", float), int(g.attrs["steps"]), sweep)
    except (OSError, KeyError) as exc:
        raise IclError(f"{path} is not a readable clean artifact ({exc}); run `icl store verify`") from None
    return layer, results


def summary_json(key: str, layer: int, results: dict[str, CleanResult]) -> dict:
    tasks = {}
    for name, r in results.items():
        tasks[name] = {"features": r.features, "weights": r.weights, "l0": r.l0, "nll": r.nll, "acc": r.acc,
                       "l0_fraction": r.l0_fraction, "loss_delta": r.loss_delta(), "steps": r.steps}
        if r.sweep:
            tasks[name]["sweep"] = r.sweep
    n = max(len(results), 1)
    mean = {
        "l0_recon": sum(r.l0["recon"] for r in results.values()) / n,
        "l0_cleaned": sum(r.l0["cleaned"] for r in results.values()) / n,
        "l0_fraction": sum(r.l0_fraction for r in results.values()) / n,
        "nll_tv": sum(r.nll["tv"] for r in results.values()) / n,
        "nll_cleaned": sum(r.nll["cleaned"] for r in results.values()) / n,
        "nll_zero_shot": sum(r.nll["zero_shot"] for r in results.values()) / n,
    }
    return {"key": key, "layer": layer, "mean": mean, "tasks": tasks}
