"""Detector → executor link with the attention pattern frozen: the ``frozen-attention`` estimand
(SPEC §8; the paper's Fig. 8; the authors' ``sprint/attn_linear_effects_full_block.py``).

    r = run_frozen_link(hm, tok, tasks, det_sae, [12, 40], exe_sae, [7, 9], AblateParams())
    r.own_vs_other()["own"]["mean"]   # mean drop of own-task pairs

For detectors d of an SAE at resid_pre[l] and executors e of an SAE at resid_pre[l + 1]:
1. Clean few-shot prompts of each task t (held-out queries). One clean pass to block l keeps
   resid_pre[l], block l's query and key projections and resid_pre[l + 1]; a_e(clean) is the
   executor's activation on resid_pre[l + 1].
2. m[t, d] = mean of a_d(resid_pre[l]) over every token of t's prompts (padding left out). A
   detector with m < 1e-6 on t is skipped there, as the authors skipped it.
3. x' = resid_pre[l] − s·m[t, d]·W_dec[d]/‖W_dec[d]‖ at every position (s = 50, the authors').
4. Block l runs on x' with its query and key projections replaced by the clean ones: the softmax
   pattern is the clean one (rotary and the scores are computed from them), while the values,
   the output projection, the block's residual adds and the MLP see x'. Every family works the
   same way: the projections are separate (q_proj, k_proj) or fused (Phi-3 ``qkv_proj``, GPT-2
   ``c_attn``, whose query and key columns come first; only the value columns are computed).
5. a_e(new) = the executor's activation on the block's output (= the new resid_pre[l + 1]). At
   every token where a_e(clean) > 0: drop = 1 − min(1, max(0, a_e(new)/a_e(clean))).
6. Per (t, d, e): the count, sum and number over 0.5 of the drops. Per pair (d, e): the drops
   pooled over the tasks that count for e (T(e): the tasks selecting e, or every task), with
   their median; own-task pairs (some task selects both) against every other pair.

Rows of one pass are prompts × a chunk of detectors (the clean q/k repeated), and only block l
runs (the pass starts at l from the cached resid_pre[l] and stops after it). Medians come from
drops rounded to 1/65535 (exact for the rounded values; within 1e-5 of the unrounded median,
the lower one for an even count).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from icl_cli.ablate.feature_ablation import AblateParams, few_shot_prompts
from icl_cli.ablate.link_parts import (check_link_saes, feature_encoder, own_matrix, per_pass, task_weights,
                                 unit_rows)
from icl_cli.core.arch import locate
from icl_cli.core.batch import encode_prompts
from icl_cli.core.errors import IclError
from icl_cli.core.sites import HookedModel, Site
from icl_cli.core.tasks import Task

SCALE = 50.0
"""x' = x − SCALE·mean(a_d)·unit direction (the authors' constant)."""
SILENT = 1e-6
"""A detector whose mean activation on a task is below this is skipped there (the authors')."""
N_BINS = 20
"""Bins over [0, 1] of the own / other drop histograms kept in the artifact."""
LEVELS = 65534
"""Drops are rounded to 1/LEVELS for the medians, kept as int16 codes level − 32768."""
_NONE = 32767  # the int16 code of "no drop here" (a silent detector); sorts after every level
HALF = 0.5

_SEPARATE = {"gemma", "gemma2", "llama", "mistral", "qwen2"}  # attn.q_proj, attn.k_proj
_FUSED = {"phi3": "qkv_proj", "gpt2": "c_attn"}  # one projection: [query | key | value] columns


# ---------------------------------------------------------------- the frozen pattern

def _qk_modules(hm: HookedModel, layer: int) -> tuple[list[nn.Module], int | None]:
    """(the modules whose outputs hold block ``layer``'s queries and keys, the number of query +
    key columns when they are one fused projection, else None)."""
    loc = locate(hm.model)
    attn = loc.blocks[layer].block.get_submodule(loc.spec.attn)
    if hm.family in _SEPARATE:
        return [attn.q_proj, attn.k_proj], None
    if hm.family == "phi3":
        hd = attn.head_dim
        return [attn.qkv_proj], (attn.config.num_attention_heads + attn.num_key_value_heads) * hd
    if hm.family == "gpt2":
        return [attn.c_attn], 2 * attn.split_size
    raise IclError(f"the frozen-attention link does not know where {hm.family} keeps its query and key projections")


@contextmanager
def capture_qk(hm: HookedModel, layer: int) -> Iterator[list[Tensor]]:
    """Within the block, a forward of block ``layer`` appends its query and key projections'
    outputs (for a fused projection, its query and key columns) to the yielded list."""
    mods, n_qk = _qk_modules(hm, layer)
    out: list[Tensor] = []

    def hook(module, args, output):
        out.append(output if n_qk is None else output[..., :n_qk])

    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _values_only(module: nn.Module, n_qk: int) -> Callable[[Tensor], Tensor]:
    """x -> the value columns of a fused projection (nn.Linear [out, in] or GPT-2's Conv1D [in, out])."""
    if isinstance(module, nn.Linear):
        w, b = module.weight[n_qk:], None if module.bias is None else module.bias[n_qk:]
        return lambda x: nn.functional.linear(x, w, b)
    w, b = module.weight[:, n_qk:], module.bias[n_qk:]
    return lambda x: torch.addmm(b, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], -1)


@contextmanager
def frozen_qk(hm: HookedModel, layer: int, cached: Sequence[Tensor]) -> Iterator[None]:
    """Within the block, block ``layer``'s query and key projections return ``cached`` (what
    ``capture_qk`` kept, rows repeated to the pass's rows) instead of computing them; a fused
    projection computes its value columns only."""
    mods, n_qk = _qk_modules(hm, layer)
    saved = [m.__dict__.get("forward") for m in mods]

    def fixed(c: Tensor, values: Callable[[Tensor], Tensor] | None):
        def forward(x: Tensor) -> Tensor:
            if tuple(x.shape[:-1]) != tuple(c.shape[:-1]):
                raise IclError(f"frozen queries/keys are cached for {tuple(c.shape[:-1])} but the pass has {tuple(x.shape[:-1])}")
            return c if values is None else torch.cat([c, values(x)], dim=-1)
        return forward

    try:
        for m, c in zip(mods, cached):
            m.forward = fixed(c, None if n_qk is None else _values_only(m, n_qk))
        yield
    finally:
        for m, old in zip(mods, saved):
            if old is None:
                del m.forward
            else:
                m.forward = old


def clean_pass(hm: HookedModel, layer: int, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(resid_pre[layer], resid_pre[layer + 1], block ``layer``'s q/k projection outputs) of a clean run."""
    pre, post = Site("resid_pre", layer), Site("resid_post", layer)
    with capture_qk(hm, layer) as qk:
        acts = hm.run(input_ids, attention_mask, read=[pre, post], stop_after=layer).acts
    return acts[pre], acts[post], list(qk)


def frozen_block(hm: HookedModel, layer: int, input_ids: Tensor, attention_mask: Tensor, x: Tensor,
                 qk: Sequence[Tensor]) -> Tensor:
    """resid_pre[layer + 1] [R, P, D] when block ``layer`` runs on x [R, P, D] with the attention
    pattern of the clean run whose q/k projections are ``qk`` (rows [B]; R = n·B repeats them)."""
    n = x.shape[0] // qk[0].shape[0]
    rep = [c.repeat(n, *([1] * (c.dim() - 1))) if n > 1 else c for c in qk]
    post = Site("resid_post", layer)
    with frozen_qk(hm, layer, rep):
        return hm.run(input_ids.repeat(n, 1), attention_mask.repeat(n, 1), read=[post], start_at=layer,
                      start_resid=x, stop_after=layer).acts[post]


def drops(new: Tensor, clean: Tensor) -> Tensor:
    """1 − min(1, max(0, new/clean)) where clean > 0 (elsewhere 0; mask them out)."""
    ratio = new / torch.where(clean > 0, clean, torch.ones_like(clean))
    return 1.0 - ratio.clamp(0.0, 1.0)


# ---------------------------------------------------------------- the result

@dataclass
class FrozenLinkResult:
    tasks: list[str]
    detectors: list[int]
    executors: list[int]
    layers: tuple[int, int]
    """(detector layer l, executor layer l + 1)."""
    scale: float
    mean_act: Tensor  # [T, D] the detector's mean activation over each task's prompt tokens
    fired: Tensor  # [T, E] long: tokens where the executor fires on the clean run
    cell_count: Tensor  # [T, D, E] long: drops measured (0 where the detector is silent on t)
    cell_sum: Tensor  # [T, D, E] float64
    cell_half: Tensor  # [T, D, E] long: drops over 0.5
    pair_median: Tensor  # [D, E] median drop pooled over T(e) (NaN without drops)
    own: Tensor  # [D, E] bool: some task selects both
    weights: Tensor  # [T, E] bool: task t counts for executor e (T(e))
    det_tasks: Tensor  # [T, D] bool: task t selects d as a detector (all False when given by id)
    exe_tasks: Tensor  # [T, E] bool: task t selects e as an executor
    group_median: Tensor  # [2] median drop pooled over own pairs, over other pairs
    group_hist: Tensor  # [2, N_BINS] long: histogram of the drops of own pairs, other pairs

    def _pooled(self, x: Tensor) -> Tensor:
        """[T, D, E] -> [D, E] summed over each executor's tasks T(e)."""
        return (x * self.weights[:, None, :].to(x.dtype)).sum(0)

    @property
    def pair_count(self) -> Tensor:
        return self._pooled(self.cell_count)

    @property
    def pair_mean(self) -> Tensor:
        """[D, E] mean drop over the tokens of T(e)'s prompts where e fires (NaN without any)."""
        n = self.pair_count
        return torch.where(n > 0, self._pooled(self.cell_sum) / n.clamp(min=1), torch.full(n.shape, float("nan"), dtype=torch.float64))

    @property
    def pair_frac_half(self) -> Tensor:
        n = self.pair_count
        return torch.where(n > 0, self._pooled(self.cell_half) / n.clamp(min=1), torch.full(n.shape, float("nan"), dtype=torch.float64))

    def own_vs_other(self) -> dict:
        """{"own"|"other": {mean, median, frac_half, pairs, positions}} pooled over the tokens of the pairs."""
        n, s, h = self.pair_count, self._pooled(self.cell_sum), self._pooled(self.cell_half)
        out = {}
        for k, (name, sel) in enumerate((("own", self.own), ("other", ~self.own))):
            sel = sel & (n > 0)
            tot = int(n[sel].sum())
            nan = float("nan")
            out[name] = {"mean": float(s[sel].sum() / tot) if tot else nan, "median": float(self.group_median[k]),
                         "frac_half": float(h[sel].sum() / tot) if tot else nan, "pairs": int(sel.sum()), "positions": tot}
        return out

    def task_matrix(self) -> tuple[list[str], list[str], Tensor]:
        """(detector tasks, executor tasks, [A, B] mean drop pooled over the tokens of every pair of
        A's detectors and B's executors); empty when the features were given by id."""
        rows = [i for i in range(len(self.tasks)) if self.det_tasks[i].any()]
        cols = [i for i in range(len(self.tasks)) if self.exe_tasks[i].any()]
        n, s = self.pair_count.double(), self._pooled(self.cell_sum)
        m = torch.full((len(rows), len(cols)), float("nan"), dtype=torch.float64)
        for a, i in enumerate(rows):
            for b, j in enumerate(cols):
                sel = self.det_tasks[i][:, None] & self.exe_tasks[j][None, :]
                if n[sel].sum() > 0:
                    m[a, b] = s[sel].sum() / n[sel].sum()
        return [self.tasks[i] for i in rows], [self.tasks[j] for j in cols], m


# ---------------------------------------------------------------- the measurement

def _median_from_counts(counts: Tensor) -> float:
    """The lower median of values v/LEVELS held ``counts[v]`` times (NaN when empty)."""
    n = int(counts.sum())
    if n == 0:
        return float("nan")
    k = (n - 1) // 2  # 0-based rank of the lower median
    return float(torch.searchsorted(counts.cumsum(0), torch.tensor(k + 1)).item()) / LEVELS


def _memberships(names: Sequence[str], ids: Sequence[int], tasks_of: Mapping[int, Sequence[str]] | None) -> Tensor:
    m = torch.zeros(len(names), len(ids), dtype=torch.bool)
    for k, f in enumerate(ids):
        for t in (tasks_of or {}).get(f, ()):
            if t in names:
                m[list(names).index(t), k] = True
    return m


@torch.no_grad()
def run_frozen_link(hm: HookedModel, tokenizer, tasks: Sequence[Task], det_sae, detectors: Sequence[int], exe_sae,
                    executors: Sequence[int], p: AblateParams, scale: float = SCALE,
                    own_pairs: Sequence[tuple[int, int]] = (), executor_tasks: Mapping[int, Sequence[str]] | None = None,
                    detector_tasks: Mapping[int, Sequence[str]] | None = None, device=None,
                    progress: Callable[[str], None] | None = None, detectors_per_pass: int | None = None) -> FrozenLinkResult:
    """Steps 1-6 above. executor_tasks / detector_tasks: feature -> the tasks selecting it (default:
    none, and every task counts for every executor). detectors_per_pass: rows of one pass are
    prompts × this many detectors (default: as many as ``link.PASS_BYTES`` of activations allow)."""
    if not (scale == scale) or abs(scale) == float("inf"):
        raise IclError(f"the link's scale must be a finite number, not {scale}")
    l, le = check_link_saes(hm, det_sae, detectors, exe_sae, executors)
    if le != l + 1:
        raise IclError(f"the frozen-attention link runs one block: the executors' layer must be the detectors' + 1 "
                       f"(detectors at {l}, executors at {le}); use --estimand ablation for layers further apart")
    names = [t.name for t in tasks]
    T, D, E = len(names), len(detectors), len(executors)
    weights = task_weights(names, executors, executor_tasks)
    own = own_matrix(detectors, executors, own_pairs)
    det_enc, exe_enc = feature_encoder(det_sae, detectors), feature_encoder(exe_sae, executors)
    mean_act = torch.zeros(T, D)
    fired = torch.zeros(T, E, dtype=torch.long)
    cell_count = torch.zeros(T, D, E, dtype=torch.long)
    cell_sum = torch.zeros(T, D, E, dtype=torch.float64)
    cell_half = torch.zeros(T, D, E, dtype=torch.long)
    codes: list[tuple[Tensor, Tensor]] = []  # per task: ([D, F] int16 drop codes, [F] executor of each column)

    for j, t in enumerate(tasks):
        if progress:
            progress(t.name)
        batch = encode_prompts(tokenizer, few_shot_prompts(t, p), n_first=p.n_first, device=device)
        ids, am = batch.input_ids, batch.attention_mask
        resid, post, qk = clean_pass(hm, l, ids, am)  # [B, P, D]
        B, P, d_model = resid.shape
        real = am.bool().to(resid.device)
        a_clean = exe_enc(post).to(resid.device)  # [B, P, E]
        fires = (a_clean > 0) & real[..., None]
        fired[j] = fires.sum((0, 1)).cpu()
        m = (det_enc(resid).to(resid.device) * real[..., None]).sum((0, 1)) / real.sum().clamp(min=1)  # [D]
        mean_act[j] = m.cpu()
        active = [i for i in range(D) if float(m[i]) >= SILENT]
        shift = scale * m[:, None] * unit_rows(det_sae, detectors).to(resid.device)  # [D, d_model]
        flat_clean, flat_fires = a_clean.reshape(B * P, E), fires.reshape(B * P, E)
        # the (token, executor) pairs whose drops are pooled: e fires there and t counts for e
        tok, col = (flat_fires & weights[j].to(resid.device)[None]).nonzero(as_tuple=True)
        q = torch.full((D, len(tok)), _NONE, dtype=torch.int16)
        step = detectors_per_pass or per_pass(B, P, hm.model.config, E, resid.device)
        for c0 in range(0, len(active), step):
            chunk = active[c0:c0 + step]
            n = len(chunk)
            x = (resid.float()[None] - shift[chunk][:, None, None, :]).to(resid.dtype)  # [n, B, P, D]
            new = frozen_block(hm, l, ids, am, x.reshape(n * B, P, d_model), qk)
            a_new = exe_enc(new).to(resid.device).reshape(n, B * P, E)
            dr = drops(a_new, flat_clean[None]) * flat_fires[None]  # [n, B·P, E], 0 where e is silent
            rows = torch.as_tensor(chunk)
            cell_count[j, rows] = flat_fires.sum(0).cpu()[None].expand(n, -1)
            cell_sum[j, rows] = dr.double().sum(1).cpu()
            cell_half[j, rows] = ((dr > HALF) & flat_fires[None]).sum(1).cpu()
            level = torch.round(dr[:, tok, col].float() * LEVELS).to(torch.int32)  # [n, F]
            q[rows] = (level - 32768).to(torch.int16).cpu()
        codes.append((q, col.cpu()))

    pair_median = torch.full((D, E), float("nan"))
    counts = torch.zeros(2, LEVELS + 1, dtype=torch.long)  # own, other: how often each level occurs
    for k in range(E):
        ck = torch.cat([q[:, col == k] for q, col in codes], dim=1)  # [D, N]: e's drops on every task of T(e)
        if ck.shape[1] == 0:
            continue
        n = (ck != _NONE).sum(1)
        srt = ck.sort(dim=1).values
        has = n > 0
        lower = srt.gather(1, ((n - 1).clamp(min=0) // 2)[:, None])[:, 0].long() + 32768  # lower median's level
        pair_median[has, k] = lower[has].float() / LEVELS
        for g, sel in ((0, own[:, k] & has), (1, ~own[:, k] & has)):
            v = ck[sel]
            counts[g] += torch.bincount(v[v != _NONE].long() + 32768, minlength=LEVELS + 1)
    group_median = torch.tensor([_median_from_counts(counts[0]), _median_from_counts(counts[1])])
    edges = torch.div(torch.arange(LEVELS + 1) * N_BINS, LEVELS + 1, rounding_mode="floor")  # level -> bin
    group_hist = torch.zeros(2, N_BINS, dtype=torch.long).index_add_(1, edges, counts)
    return FrozenLinkResult(names, list(detectors), list(executors), (l, le), float(scale), mean_act, fired, cell_count,
                            cell_sum, cell_half, pair_median, own, weights, _memberships(names, detectors, detector_tasks),
                            _memberships(names, executors, executor_tasks), group_median, group_hist)


# ---------------------------------------------------------------- the artifact

_ARRAYS = ("mean_act", "fired", "cell_count", "cell_sum", "cell_half", "pair_median", "own", "weights", "det_tasks",
           "exe_tasks", "group_median", "group_hist")


def write_h5(f, r: FrozenLinkResult) -> None:
    """/tasks [T] str, /detectors [D], /executors [E] int64, /mean_act [T, D], /fired [T, E],
    /cell_count /cell_sum /cell_half [T, D, E], /pair_median [D, E], /own [D, E] bool,
    /weights /exe_tasks [T, E] bool, /det_tasks [T, D] bool, /group_median [2], /group_hist
    [2, N_BINS] (own, other), and for readers /pair_mean /pair_frac_half /pair_count [D, E];
    attrs estimand ("frozen-attention"), scale, detector_layer, executor_layer."""
    import h5py

    f.create_dataset("tasks", data=r.tasks, dtype=h5py.string_dtype())
    f.create_dataset("detectors", data=torch.tensor(r.detectors, dtype=torch.long).numpy())
    f.create_dataset("executors", data=torch.tensor(r.executors, dtype=torch.long).numpy())
    for name in _ARRAYS + ("pair_mean", "pair_frac_half", "pair_count"):
        f.create_dataset(name, data=getattr(r, name).numpy())
    f.attrs.update({"estimand": "frozen-attention", "scale": r.scale, "detector_layer": r.layers[0],
                    "executor_layer": r.layers[1]})


def read_group(f) -> tuple[FrozenLinkResult, dict]:
    """(result, attrs) from an open ``link.h5`` written by ``write_h5``."""
    tasks = [x.decode() if isinstance(x, bytes) else str(x) for x in f["tasks"][()]]
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    arrays = {k: torch.from_numpy(f[k][()]) for k in _ARRAYS}
    r = FrozenLinkResult(tasks, f["detectors"][()].tolist(), f["executors"][()].tolist(),
                         (int(attrs["detector_layer"]), int(attrs["executor_layer"])), float(attrs["scale"]), **arrays)
    return r, attrs


def feature_labels(ids: Sequence[int], member: Tensor, tasks: Sequence[str]) -> list[str]:
    """"12 (antonyms, en_es)": each feature with the tasks that select it ([T, n] membership)."""
    out = []
    for k, f in enumerate(ids):
        names = [tasks[t] for t in member[:, k].nonzero().flatten().tolist()]
        out.append(f"{f} ({', '.join(names)})" if names else str(f))
    return out


def summary_json(key: str, r: FrozenLinkResult) -> dict:
    """The ``--json`` document: per pair (rows detectors, columns executors) mean / median /
    fraction over 0.5 / count of the drops; own-task pairs against the others; the task matrix."""
    nan = lambda x: None if x != x else float(x)  # noqa: E731
    grid = lambda m: [[nan(x) for x in row] for row in m.tolist()]  # noqa: E731
    rows, cols, tm = r.task_matrix()
    groups = {g: {k: nan(v) if isinstance(v, float) else v for k, v in d.items()} for g, d in r.own_vs_other().items()}
    return {"key": key, "estimand": "frozen-attention", "scale": r.scale, "detector_layer": r.layers[0],
            "executor_layer": r.layers[1], "tasks": r.tasks, "detectors": r.detectors, "executors": r.executors,
            "detector_labels": feature_labels(r.detectors, r.det_tasks, r.tasks),
            "executor_labels": feature_labels(r.executors, r.exe_tasks, r.tasks),
            "mean_drop": grid(r.pair_mean), "median_drop": grid(r.pair_median), "frac_over_half": grid(r.pair_frac_half),
            "count": r.pair_count.tolist(), "own": r.own.tolist(), "own_pairs": groups["own"], "other_pairs": groups["other"],
            "histogram_bins": N_BINS, "own_histogram": r.group_hist[0].tolist(), "other_histogram": r.group_hist[1].tolist(),
            "silent_detectors": {t: [r.detectors[i] for i in range(len(r.detectors)) if r.mean_act[j, i] < SILENT]
                                 for j, t in enumerate(r.tasks)},
            "task_matrix": {"detector_tasks": rows, "executor_tasks": cols, "mean_drop": grid(tm)}}
