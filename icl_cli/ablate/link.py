"""Detector → executor link (SPEC §8; Kharlapenko et al. 2025, §4.3).

For detectors d of an SAE at resid_pre[l_d] and executors e of an SAE at resid_pre[l_e], l_d < l_e:
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

FORMAT_VERSION = 1
REMOVALS = ("project", "feature", "steer")


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


@torch.no_grad()
def run_link(hm: HookedModel, tokenizer, tasks: Sequence[Task], det_sae, detectors: Sequence[int], exe_sae,
             executors: Sequence[int], p: AblateParams, removal: str = "project", scale: float = 1.0,
             own_pairs: Sequence[tuple[int, int]] = (), executor_tasks: Mapping[int, Sequence[str]] | None = None,
             device=None, progress: Callable[[str], None] | None = None) -> LinkResult:
    """Steps 1-4 above. executor_tasks: e -> the tasks that count for it (default: every task)."""
    ld, le = det_sae.cfg.layer, exe_sae.cfg.layer
    if removal not in REMOVALS:
        raise IclError(f"--removal must be one of {', '.join(REMOVALS)}, not {removal!r}")
    if not (scale == scale) or abs(scale) == float("inf"):
        raise IclError(f"--scale must be a finite number, not {scale}")
    for sae, what in ((det_sae, "detector"), (exe_sae, "executor")):
        if sae.cfg.site != "resid_pre" or sae.cfg.layer is None:
            raise IclError(f"the {what} SAE must be a resid_pre SAE with a known layer (it is {sae.cfg.site}, layer {sae.cfg.layer})")
    if not 0 <= ld < le < hm.n_layers:
        raise IclError(f"the detectors' layer ({ld}) must come before the executors' ({le}) within the model's {hm.n_layers} layers")
    for ids, sae, what in ((detectors, det_sae, "detector"), (executors, exe_sae, "executor")):
        bad = [f for f in ids if not 0 <= f < sae.cfg.d_sae]
        if bad:
            raise IclError(f"{what} feature(s) {bad} are beyond the SAE's width {sae.cfg.d_sae}")
    if not detectors or not executors:
        raise IclError("the link needs at least one detector and one executor")
    names = [t.name for t in tasks]
    exe = torch.as_tensor(list(executors), dtype=torch.long)
    start, read = Site("resid_pre", ld), Site("resid_post", le - 1)  # resid_post[le-1] is resid_pre[le]
    before = torch.zeros(len(names), len(executors))
    after = torch.zeros(len(detectors), len(names), len(executors))

    def at_arrows(out, arrows: Tensor) -> Tensor:
        a = exe_sae.encode(out.acts[read].to(exe_sae.W_enc.device))[..., exe.to(exe_sae.W_enc.device)].float()
        return (a * arrows[..., None].to(a)).sum((0, 1)).cpu()  # [E]

    for j, t in enumerate(tasks):
        if progress:
            progress(t.name)
        batch = encode_prompts(tokenizer, few_shot_prompts(t, p), n_first=p.n_first, device=device)
        resid = hm.run(batch.input_ids, batch.attention_mask, read=[start], stop_after=ld).acts[start]
        arrows, outputs = batch.role_mask("arrow"), batch.role_mask("output")
        run = lambda edit: hm.run(batch.input_ids, batch.attention_mask, read=[read], edit=edit,  # noqa: E731
                                  start_at=ld, start_resid=resid, stop_after=le - 1)
        before[j] = at_arrows(run({}), arrows)
        for i, d in enumerate(detectors):
            after[i, j] = at_arrows(run({start: removal_edit(det_sae, d, outputs, removal, scale)}), arrows)
    own = torch.zeros(len(detectors), len(executors), dtype=torch.bool)
    for d, e in own_pairs:
        if d in detectors and e in executors:
            own[list(detectors).index(d), list(executors).index(e)] = True
    weights = torch.ones(len(names), len(executors), dtype=torch.bool)
    if executor_tasks is not None:
        for k, e in enumerate(executors):
            if executor_tasks.get(e):
                weights[:, k] = torch.tensor([n in executor_tasks[e] for n in names])
    return LinkResult(names, list(detectors), list(executors), before, after, own, weights)


def write_h5(f, r: LinkResult, removal: str, scale: float, layers: tuple[int, int]) -> None:
    """/tasks [T] str, /detectors [D], /executors [E] int64, /before [T, E], /after [D, T, E],
    /ratio [D, E], /own [D, E] bool, /weights [T, E] bool; attrs removal, scale, detector_layer, executor_layer."""
    import h5py

    f.create_dataset("tasks", data=r.tasks, dtype=h5py.string_dtype())
    f.create_dataset("detectors", data=torch.tensor(r.detectors, dtype=torch.long).numpy())
    f.create_dataset("executors", data=torch.tensor(r.executors, dtype=torch.long).numpy())
    for name in ("before", "after", "own", "weights", "ratio"):
        f.create_dataset(name, data=getattr(r, name).numpy())
    f.attrs.update({"removal": removal, "scale": scale, "detector_layer": layers[0], "executor_layer": layers[1]})


def read_h5(path) -> tuple[LinkResult, dict]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            tasks = [x.decode() if isinstance(x, bytes) else str(x) for x in f["tasks"][()]]
            g = lambda k: torch.from_numpy(f[k][()])  # noqa: E731
            r = LinkResult(tasks, f["detectors"][()].tolist(), f["executors"][()].tolist(), g("before"), g("after"),
                           g("own"), g("weights"))
            return r, {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as exc:
        raise IclError(f"{path} is not a readable link artifact ({exc}); run `icl store verify`") from None


def summary_json(key: str, r: LinkResult, attrs: dict) -> dict:
    ratio = r.ratio
    own_mean, other_mean, n_own, n_other = r.own_vs_other()
    nan = lambda x: None if x != x else float(x)  # noqa: E731
    return {"key": key, "removal": attrs.get("removal"), "detector_layer": attrs.get("detector_layer"),
            "executor_layer": attrs.get("executor_layer"), "detectors": r.detectors, "executors": r.executors,
            "ratio": [[nan(x) for x in row] for row in ratio.tolist()], "own": r.own.tolist(),
            "own_mean_ratio": nan(own_mean), "other_mean_ratio": nan(other_mean), "n_own": n_own, "n_other": n_other}
