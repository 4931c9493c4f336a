"""Detector → executor link (SPEC §8; Kharlapenko et al. 2025, §4.3): two estimands.

``frozen-attention`` (the default, the paper's Fig. 8) lives in ``link_frozen.py``. This module
holds ``ablation``, a ratio through the whole model (a second estimand, named apart), the
artifact both write (``link.h5``, attr ``estimand``) and what they share: the executors'
encoder restricted to the executors (``feature_encoder``).

The ablation estimand, for detectors d of an SAE at resid_pre[l_d] and executors e of an SAE at resid_pre[l_e], l_d < l_e:
1. Few-shot prompts of each task (held-out queries); resid_pre[l_d] is computed once per task.
2. before[t, e] = Σ over the arrow tokens of task t's prompts of e's activation (clean run).
3. For each detector d: remove its decoder direction u = W_dec[d]/‖W_dec[d]‖ from resid_pre[l_d]
   at the output tokens, run blocks l_d … l_e − 1, and sum e's activation at the arrows:
   after[d, t, e]. Removal, per ``removal``:
     project  x ← x − ⟨x, u⟩u          (the residual's component along the direction)
     feature  x ← x − a_d(x) W_dec[d]  (the detector's own contribution: zero-ablating it)
     steer    x ← x − s·u              (negative steering at scale s, SPEC §6)
4. ratio[d, e] = Σ_{t ∈ T(e)} after[d, t, e] / Σ_{t ∈ T(e)} before[t, e], where T(e) are the
   tasks that select e as an executor (every task when the pairs are given by hand).
A pair is "own" when some task selects d as a detector and e as an executor; the summary
compares the mean ratio of own pairs with the mean over every other pair (random pairing).
Detectors are batched: rows = prompts × a chunk of detectors, one pass per chunk
(``detectors_per_pass``; 1 is today's loop, one pass per detector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from icl_cli.ablate.feature_ablation import AblateParams, few_shot_prompts
from icl_cli.core.batch import encode_prompts
from icl_cli.core.sites import Edit, HookedModel, Site
from icl_cli.core.tasks import Task
from icl_cli.core.errors import IclError
from icl_cli.ablate.link_parts import (PASS_BYTES, check_link_saes, feature_encoder, own_matrix, per_pass,  # noqa: F401
                                      task_weights, unit_rows)

FORMAT_VERSION = 2
"""2: the artifact records its estimand (attr ``estimand``); 1 had only the ablation ratio."""
REMOVALS = ("project", "feature", "steer")
ESTIMANDS = ("frozen-attention", "ablation")
"""Activation memory one batched pass may use (sizes ``detectors_per_pass`` when not given). On a
CPU, passes that stay near the caches are quicker than large ones (toy-icl: 2 detectors of 16
prompts per pass took 0.6–0.85× the time of 16 per pass); an accelerator wants large passes."""


@dataclass
class LinkResult:
    tasks: list[str]
    detectors: list[int]
    executors: list[int]
    before: Tensor  # [T, E]
    after: Tensor  # [D, T, E]
    own: Tensor  # [D, E] bool: some task selects both
    weights: Tensor  # [T, E] bool: task t counts for executor e (T(e))

    @property
    def ratio(self) -> Tensor:
        """[D, E] after / before over each executor's tasks (NaN where it never fired before)."""
        w = self.weights.float()
        before = (self.before * w).sum(0)  # [E]
        after = (self.after * w).sum(1)  # [D, E]
        return torch.where(before > 0, after / before.clamp(min=1e-30), torch.full_like(after, float("nan")))

    def own_vs_other(self) -> tuple[float, float, int, int]:
        """(mean ratio of own pairs, mean ratio of every other pair, their counts), NaN cells skipped."""
        r = self.ratio
        ok = ~torch.isnan(r)
        own, other = r[self.own & ok], r[~self.own & ok]
        mean = lambda x: float(x.mean()) if x.numel() else float("nan")  # noqa: E731
        return mean(own), mean(other), own.numel(), other.numel()


def removal_edit(det_sae, d: int, mask: Tensor, removal: str, scale: float) -> Edit:
    """fn(x) removing detector ``d``'s direction from x [B, P, D] where ``mask`` [B, P] is true."""
    w = det_sae.W_dec[d].float()
    u = w / w.norm().clamp(min=1e-12)

    def fn(x: Tensor) -> Tensor:
        xf = x.float()
        if removal == "project":
            delta = -(xf @ u.to(x.device))[..., None] * u.to(x.device)
        elif removal == "feature":
            a = det_sae.encode(x.to(det_sae.W_enc.device))[..., d].float()
            delta = -a.to(x.device)[..., None] * w.to(x.device)
        else:
            delta = -scale * u.to(x.device).expand_as(xf)
        return (xf + mask.to(x.device)[..., None].float() * delta).to(x.dtype)

    return fn


def _removal_deltas(x: Tensor, U: Tensor, acts: Tensor | None, W: Tensor, mask: Tensor, removal: str, scale: float) -> Tensor:
    """[n, B, P, D] float: what ``removal_edit`` adds to x [B, P, D] for each of n detectors
    (unit directions U [n, D], decoder rows W [n, D], their activations on x ``acts`` [B, P, n])."""
    xf = x.float()
    m = mask.to(x.device)[None, ..., None].float()  # [1, B, P, 1]
    if removal == "project":
        coef = torch.einsum("bpd,nd->nbp", xf, U)
        return -m * coef[..., None] * U[:, None, None, :]
    if removal == "feature":
        a = acts.permute(2, 0, 1).to(x.device)  # [n, B, P]
        return -m * a[..., None] * W[:, None, None, :]
    return -m * scale * U[:, None, None, :].expand(-1, *x.shape[:2], -1)


@torch.no_grad()
def run_link(hm: HookedModel, tokenizer, tasks: Sequence[Task], det_sae, detectors: Sequence[int], exe_sae,
             executors: Sequence[int], p: AblateParams, removal: str = "project", scale: float = 1.0,
             own_pairs: Sequence[tuple[int, int]] = (), executor_tasks: Mapping[int, Sequence[str]] | None = None,
             device=None, progress: Callable[[str], None] | None = None,
             detectors_per_pass: int | None = None) -> LinkResult:
    """Steps 1-4 above (the ``ablation`` estimand). executor_tasks: e -> the tasks that count for
    it (default: every task). detectors_per_pass: rows of one pass are prompts × this many
    detectors (default: as many as ``PASS_BYTES`` of activations allow)."""
    if removal not in REMOVALS:
        raise IclError(f"--removal must be one of {', '.join(REMOVALS)}, not {removal!r}")
    if not (scale == scale) or abs(scale) == float("inf"):
        raise IclError(f"--scale must be a finite number, not {scale}")
    ld, le = check_link_saes(hm, det_sae, detectors, exe_sae, executors)
    names = [t.name for t in tasks]
    start, read = Site("resid_pre", ld), Site("resid_post", le - 1)  # resid_post[le-1] is resid_pre[le]
    exe_enc = feature_encoder(exe_sae, executors)
    det_enc = feature_encoder(det_sae, detectors) if removal == "feature" else None
    before = torch.zeros(len(names), len(executors))
    after = torch.zeros(len(detectors), len(names), len(executors))

    for j, t in enumerate(tasks):
        if progress:
            progress(t.name)
        batch = encode_prompts(tokenizer, few_shot_prompts(t, p), n_first=p.n_first, device=device)
        ids, am = batch.input_ids, batch.attention_mask
        resid = hm.run(ids, am, read=[start], stop_after=ld).acts[start]  # [B, P, D]
        arrows, outputs = batch.role_mask("arrow").to(resid.device), batch.role_mask("output")
        B, P, D = resid.shape
        U, W = unit_rows(det_sae, detectors).to(resid.device), det_sae.W_dec[list(detectors)].float().to(resid.device)
        acts = det_enc(resid).to(resid.device) if det_enc else None  # [B, P, n_det] for removal "feature"
        clean = hm.run(ids, am, read=[read], start_at=ld, start_resid=resid, stop_after=le - 1).acts[read]
        before[j] = (exe_enc(clean).to(resid.device) * arrows[..., None]).sum((0, 1)).cpu()
        step = detectors_per_pass or per_pass(B, P, hm.model.config, len(executors), resid.device)
        for c0 in range(0, len(detectors), step):
            n = min(step, len(detectors) - c0)
            sl = slice(c0, c0 + n)
            delta = _removal_deltas(resid, U[sl], acts[..., sl] if acts is not None else None, W[sl], outputs, removal, scale)
            x = (resid.float()[None] + delta).to(resid.dtype)  # [n, B, P, D]
            out = hm.run(ids.repeat(n, 1), am.repeat(n, 1), read=[read], start_at=ld, start_resid=x.reshape(n * B, P, D),
                         stop_after=le - 1).acts[read]
            a = exe_enc(out).to(resid.device).reshape(n, B, P, -1)
            after[sl, j] = (a * arrows[None, ..., None]).sum((1, 2)).cpu()
    own = own_matrix(detectors, executors, own_pairs)
    return LinkResult(names, list(detectors), list(executors), before, after, own, task_weights(names, executors, executor_tasks))


def write_h5(f, r: LinkResult, removal: str, scale: float, layers: tuple[int, int]) -> None:
    """The ablation estimand: /tasks [T] str, /detectors [D], /executors [E] int64, /before [T, E],
    /after [D, T, E], /ratio [D, E], /own [D, E] bool, /weights [T, E] bool; attrs estimand
    ("ablation"), removal, scale, detector_layer, executor_layer."""
    import h5py

    f.create_dataset("tasks", data=r.tasks, dtype=h5py.string_dtype())
    f.create_dataset("detectors", data=torch.tensor(r.detectors, dtype=torch.long).numpy())
    f.create_dataset("executors", data=torch.tensor(r.executors, dtype=torch.long).numpy())
    for name in ("before", "after", "own", "weights", "ratio"):
        f.create_dataset(name, data=getattr(r, name).numpy())
    f.attrs.update({"estimand": "ablation", "removal": removal, "scale": scale, "detector_layer": layers[0],
                    "executor_layer": layers[1]})


def read_h5(path):
    """(result, attrs) of either estimand: a LinkResult (ablation) or a FrozenLinkResult
    (frozen-attention), told apart by attr ``estimand`` (format 1 artifacts have none: ablation)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("estimand", "ablation") == "frozen-attention":
                from icl_cli.ablate.link_frozen import read_group

                return read_group(f)
            tasks = [x.decode() if isinstance(x, bytes) else str(x) for x in f["tasks"][()]]
            g = lambda k: torch.from_numpy(f[k][()])  # noqa: E731
            r = LinkResult(tasks, f["detectors"][()].tolist(), f["executors"][()].tolist(), g("before"), g("after"),
                           g("own"), g("weights"))
            return r, {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as exc:
        raise IclError(f"{path} is not a readable link artifact ({exc}); run `icl store verify`") from None


def summary_json(key: str, r, attrs: dict) -> dict:
    """The ``--json`` document of either estimand."""
    if attrs.get("estimand") == "frozen-attention":
        from icl_cli.ablate.link_frozen import summary_json as frozen_summary

        return frozen_summary(key, r)
    ratio = r.ratio
    own_mean, other_mean, n_own, n_other = r.own_vs_other()
    nan = lambda x: None if x != x else float(x)  # noqa: E731
    return {"key": key, "estimand": "ablation", "removal": attrs.get("removal"), "detector_layer": attrs.get("detector_layer"),
            "executor_layer": attrs.get("executor_layer"), "detectors": r.detectors, "executors": r.executors,
            "ratio": [[nan(x) for x in row] for row in ratio.tolist()], "own": r.own.tolist(),
            "own_mean_ratio": nan(own_mean), "other_mean_ratio": nan(other_mean), "n_own": n_own, "n_other": n_other}


# ---------------------------------------------------------------- one call for the step

def measure(estimand: str, hm: HookedModel, tokenizer, tasks: Sequence[Task], det_sae, detectors: Sequence[int], exe_sae,
            executors: Sequence[int], p: AblateParams, removal: str = "project", scale: float = 25.0,
            own_pairs: Sequence[tuple[int, int]] = (), executor_tasks: Mapping[int, Sequence[str]] | None = None,
            detector_tasks: Mapping[int, Sequence[str]] | None = None, device=None,
            progress: Callable[[str], None] | None = None):
    """(result, attrs) of ``estimand``: frozen-attention (``link_frozen``; removal and scale unused)
    or ablation (``run_link`` with that removal and scale)."""
    if estimand not in ESTIMANDS:
        raise IclError(f"--estimand must be one of {', '.join(ESTIMANDS)}, not {estimand!r}")
    if estimand == "frozen-attention":
        from icl_cli.ablate.link_frozen import run_frozen_link

        r = run_frozen_link(hm, tokenizer, tasks, det_sae, detectors, exe_sae, executors, p, own_pairs=own_pairs,
                            executor_tasks=executor_tasks, detector_tasks=detector_tasks, device=device, progress=progress)
        return r, {"estimand": estimand, "scale": r.scale, "detector_layer": r.layers[0], "executor_layer": r.layers[1]}
    r = run_link(hm, tokenizer, tasks, det_sae, detectors, exe_sae, executors, p, removal, scale, own_pairs,
                 executor_tasks, device, progress)
    return r, {"estimand": estimand, "removal": removal, "scale": scale, "detector_layer": det_sae.cfg.layer,
               "executor_layer": exe_sae.cfg.layer}


def write_result(f, r, attrs: dict) -> None:
    """``link.h5`` of either estimand (see ``write_h5`` and ``link_frozen.write_h5``)."""
    if attrs["estimand"] == "frozen-attention":
        from icl_cli.ablate.link_frozen import write_h5 as write_frozen

        return write_frozen(f, r)
    write_h5(f, r, attrs["removal"], attrs["scale"], (attrs["detector_layer"], attrs["executor_layer"]))


def store_summary(r, attrs: dict) -> dict:
    """The few numbers the store keeps beside the artifact."""
    if attrs["estimand"] == "frozen-attention":
        g = r.own_vs_other()
        return {"estimand": attrs["estimand"], "own_mean_drop": g["own"]["mean"], "other_mean_drop": g["other"]["mean"]}
    own_mean, other_mean, _, _ = r.own_vs_other()
    return {"estimand": attrs["estimand"], "own_mean_ratio": own_mean, "other_mean_ratio": other_mean}
