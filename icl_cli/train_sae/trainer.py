"""Training SAEs and transcoders on streamed activations (SPEC §9).

    results = train_dictionaries(TrainConfig(layers=[1, 3], arch="gated"), lm, work_dir=..., resume=False)

1. The model runs over token chunks and stops after the deepest layer needed; one forward pass
   feeds the dictionaries of every requested layer (data.py).
2. Activations go through an in-memory shuffle buffer. The first fill fixes each site's input
   scale n = √d / mean‖x‖ (and n_out for a transcoder's target).
3. Each step: every dictionary's loss on the same batch, one Adam step (lr decays linearly over the
   last 20% of steps, the sparsity coefficient warms up over the first 5%); bf16 autocast on GPU.
4. Dead features (no firing for `dead_window` tokens): AuxK for top-k; otherwise features silent
   since the last resample are resampled at 20/40/60% of training towards badly reconstructed
   inputs (Bricken et al. 2023), their Adam moments reset.
5. A checkpoint at the start of every `checkpoint_every`-th step holds the weights, Adam state,
   RNG states, the buffer's contents and the data position, so a resumed run on CPU ends with the
   same weights as an uninterrupted one. A NaN loss stops the run and keeps the last good checkpoint.
6. At the end the input scale is folded into the weights and the dictionaries are evaluated on
   held-out tokens (evaluate.py).
7. Under torchrun the forward passes and each step's batch are split over the ranks, gradients and
   metrics all-reduced (distributed.py): the result is that of one process with the same batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from icl_cli.dictionaries import DictConfig, Dictionary, build
from icl_cli.core.errors import IclError
from icl_cli.train_sae import checkpoint as ckpt
from icl_cli.train_sae import distributed as dist
from icl_cli.train_sae.config import SITE_KINDS, TrainConfig
from icl_cli.train_sae.data import ActivationSource, ShuffleBuffer, chunk_stream
from icl_cli.train_sae.evaluate import evaluate

RESAMPLE_AT = (0.2, 0.4, 0.6)
CURVES = ("step", "tokens", "loss", "mse", "l0", "fvu", "dead", "lr")

Progress = Callable[[dict], None]


@dataclass
class Trained:
    """One trained dictionary with its metrics and training curves."""

    layer: int
    sae: Dictionary
    metrics: dict
    curves: dict[str, list[float]]
    sparsity: Tensor
    """[d_sae] log10 firing frequency over the last 20% of training."""
    config: dict = field(default_factory=dict)
    site: str = ""
    """resid | attn | transcoder (several sites can train on one pass: train_dictionaries(sites=))."""


def site_reads(site: str, layers: list[int]) -> list[tuple]:
    """(input site, output site or None) per layer."""
    from icl_cli.core.sites import Site

    kind = SITE_KINDS[site]
    if kind == "transcoder":
        return [(Site("mlp_in", l), Site("mlp_out", l)) for l in layers]
    return [(Site(kind, l), None) for l in layers]


class _State:
    """Everything that changes during training, in tensors, so it round-trips a checkpoint."""

    def __init__(self, n: int, d_sae: int):
        self.step = 0
        self.tokens = 0
        self.n_in = torch.ones(n)
        self.n_out = torch.ones(n)
        self.last_fired = torch.zeros(n, d_sae, dtype=torch.long)  # token count when last fired
        self.fired_since_resample = torch.zeros(n, d_sae, dtype=torch.bool)
        self.late_counts = torch.zeros(n, d_sae, dtype=torch.long)  # firings in the last 20%
        self.late_tokens = 0
        self.resampled = torch.zeros(n, dtype=torch.long)
        self.curves: list[dict[str, list[float]]] = [{k: [] for k in CURVES} for _ in range(n)]

    TENSORS = ("n_in", "n_out", "last_fired", "fired_since_resample", "late_counts", "resampled")

    def to_tensors(self) -> dict[str, Tensor]:
        out = {f"state.{k}": getattr(self, k) for k in self.TENSORS}
        for i, c in enumerate(self.curves):
            for k, v in c.items():
                out[f"curves.{i}.{k}"] = torch.tensor(v, dtype=torch.float64)
        return out

    def load(self, t: dict[str, Tensor], meta: dict) -> None:
        for k in self.TENSORS:
            setattr(self, k, t[f"state.{k}"].clone())
        for i, c in enumerate(self.curves):
            for k in c:
                c[k] = t[f"curves.{i}.{k}"].tolist()
        self.step, self.tokens, self.late_tokens = meta["step"], meta["tokens"], meta["late_tokens"]


def train_dictionaries(
    cfg: TrainConfig,
    lm,
    work_dir: Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    sites: Sequence[str] | None = None,
) -> list[Trained]:
    """Train one dictionary per layer of `cfg` on `lm` (model, tokenizer, n_layers, d_model, device).

    sites: train one per (site, layer) for each of these sites instead of cfg.site, all on the same
    forward passes (a dictionary suite harvested in one pass, dictionaries/suite_build.py)."""
    from icl_cli.core.sites import HookedModel

    cfg = cfg.resolved(lm.d_model, lm.n_layers)
    device = torch.device(lm.device) if not isinstance(lm.device, torch.device) else lm.device
    grp = dist.current()
    hm = HookedModel(lm.model)
    members = [(site, layer) for site in (sites or [cfg.site]) for layer in cfg.layers]
    reads = [r for site in (sites or [cfg.site]) for r in site_reads(site, cfg.layers)]
    n = len(reads)

    # One generator per dictionary, seeded by what its key hashes (seed, site, layer): a layer
    # trained alone gets the same initial weights and resamples as among other layers.
    g_init = [init_generator(cfg.seed, site, layer) for site, layer in members]
    g_data = torch.Generator().manual_seed(cfg.seed + 1)
    dicts = []
    for (site, layer), gen in zip(members, g_init):
        d = build(DictConfig(d_in=lm.d_model, d_sae=cfg.width, arch=cfg.arch, model=cfg.model, site=SITE_KINDS[site],
                             layer=layer, k=cfg.k if cfg.arch == "topk" else 0))
        d.reset_parameters(gen)
        dicts.append(d.to(device))
    params = [p for d in dicts for p in d.parameters()]
    opt = make_optimizer(params, cfg.lr)

    ctx = cfg.ctx
    n_eval = max(1, math.ceil(cfg.eval_tokens / max(ctx - 1, 1)))
    train_chunks, eval_chunks, eval_targets = chunk_stream(cfg.dataset, lm.tokenizer, ctx, cfg.seed, n_eval)
    if not eval_chunks:
        raise IclError(f"the dataset {cfg.dataset!r} yielded no tokens; check --dataset")
    rows = max(1, min(64, cfg.batch_tokens // ctx))
    store_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if grp.active:
        src = dist.ShardedSource(hm, lm.tokenizer, train_chunks, reads, rows, device, store_dtype, group=grp)
    else:
        src = ActivationSource(hm, lm.tokenizer, train_chunks, reads, rows, device, store_dtype)
    buf = ShuffleBuffer(src, cfg.buffer_batches * cfg.batch_tokens, g_data)
    st = _State(n, cfg.width)

    total_steps = max(1, cfg.tokens // cfg.batch_tokens)
    dead_window = max(cfg.batch_tokens, min(10_000_000, cfg.tokens // 5))
    late_from = int(0.8 * total_steps)
    resample_steps = set() if cfg.arch == "topk" else {int(total_steps * f) for f in RESAMPLE_AT} - {0}
    log_every = max(1, total_steps // 200)
    identity = _identity(cfg) + ("" if sites is None else "+" + ",".join(sites))

    resumed_at = None
    got = ckpt.load(work_dir) if (work_dir is not None and resume) else None
    if got is not None:
        tensors, meta = got
        if meta.get("identity") != identity:
            raise IclError(f"the checkpoint in {work_dir} belongs to other settings; rerun without --resume")
        for i, d in enumerate(dicts):
            d.load_state_dict({k[len(f"sae{i}.") :]: v.to(device) for k, v in tensors.items() if k.startswith(f"sae{i}.")})
        ckpt.load_optimizer(opt, {k: v.to(device) for k, v in tensors.items() if k.startswith("opt.")})
        g_data.set_state(tensors["rng.data"])
        for i, gen in enumerate(g_init):
            gen.set_state(tensors[f"rng.init.{i}"])
        st.load(tensors, meta)
        buf.load({k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("buf.")})
        src.skip(meta["position"])
        buf.exhausted = meta["exhausted"]
        resumed_at = st.step
    else:
        if work_dir is not None and grp.leader:
            for name in (ckpt.LATEST, ckpt.PREVIOUS):
                (work_dir / name).unlink(missing_ok=True)
        buf._refill()
        if buf.x is None or buf.x.shape[0] == 0:
            raise IclError(f"the dataset {cfg.dataset!r} yielded no training tokens; check --dataset")
        # per layer (not one reduction over [N, n, d]) so a layer's numbers do not depend on the others
        st.n_in = _input_scale(buf.x, lm.d_model)
        st.n_out = _input_scale(buf.t, lm.d_model) if buf.t is not None else st.n_in.clone()
        target0 = buf.t if buf.t is not None else buf.x
        with torch.no_grad():
            for i, d in enumerate(dicts):  # start the decoder bias at the mean target
                d.b_dec.copy_(target0[:, i].float().contiguous().mean(0) * st.n_out[i].to(target0.device))

    dist.broadcast_params(params, grp)  # identical already (same seeds, same buffer); made certain
    n_in, n_out = st.n_in.to(device), st.n_out.to(device)
    t_start, tok_start = time.perf_counter(), st.tokens
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    while st.step < total_steps:
        step = st.step
        if (work_dir is not None and grp.leader and cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                and step > 0 and step != resumed_at):
            _save(work_dir, dicts, opt, g_data, g_init, st, buf, src, identity)
        if step in resample_steps and step != resumed_at:
            _resample(dicts, opt, buf, st, n_in, n_out, g_init)

        lr = cfg.lr * min(1.0, (total_steps - step) / max(1.0, 0.2 * total_steps))
        coeff = cfg.l1 * min(1.0, (step + 1) / max(1.0, 0.05 * total_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, t = buf.next_batch(cfg.batch_tokens)
        if x.shape[0] == 0:
            break  # a finite dataset ran out
        B = x.shape[0]
        rows_r, weight, counts_here = dist.local_rows(B, grp)  # all rows with one process
        total = torch.zeros((), device=device)
        stats = []
        with amp:
            for i, d in enumerate(dicts):
                t_all = (t[:, i] if t is not None else x[:, i]).float() * n_out[i]  # [B, d_out]
                xi = x[rows_r, i].float() * n_in[i]
                ti = t_all[rows_r]
                dead = (st.tokens - st.last_fired[i]) > dead_window if cfg.arch == "topk" else None
                parts = d.training_loss(xi, ti, coeff, None if dead is None else dead.to(device))
                total = total + parts.loss
                var = (t_all - t_all.mean(0)).pow(2).sum(-1).mean()  # over the global batch
                stats.append((parts, var))
        # [n, 2]: loss and MSE, weighted so the sum over ranks is the global batch mean
        losses = dist.all_reduce_sum(torch.stack([torch.stack([p.loss.detach().float(), p.mse.detach().float()])
                                                  for p, _ in stats]) * weight, grp)
        if not torch.isfinite(losses).all():
            raise _nan_error(work_dir if grp.leader else None, step)
        opt.zero_grad(set_to_none=True)
        total.backward()
        dist.all_reduce_grads(params, weight, grp)
        opt.step()
        for d in dicts:
            d.after_step()

        # [n, d_sae] firings per feature over the global batch
        counts = torch.stack([p.fired.sum(0) if counts_here else torch.zeros_like(p.fired[0], dtype=torch.long)
                              for p, _ in stats]).long()
        counts = dist.all_reduce_sum(counts, grp).cpu()
        st.tokens += B
        st.step += 1
        for i in range(n):
            fired = counts[i] > 0
            st.last_fired[i][fired] = st.tokens
            st.fired_since_resample[i] |= fired
            if step >= late_from:
                st.late_counts[i] += counts[i]
        if step >= late_from:
            st.late_tokens += B
        l0s = [float(counts[i].sum()) / B for i in range(n)]
        fvus = [float(losses[i, 1] / v.clamp_min(1e-12)) for i, (_, v) in enumerate(stats)]
        if step % log_every == 0 or st.step == total_steps:
            for i in range(n):
                c = st.curves[i]
                dead_now = int(((st.tokens - st.last_fired[i]) > dead_window).sum())
                for k, v in zip(CURVES, (st.step, st.tokens, float(losses[i, 0]), float(losses[i, 1]), l0s[i], fvus[i], dead_now, lr)):
                    c[k].append(float(v))
        if progress is not None:
            elapsed = max(time.perf_counter() - t_start, 1e-9)
            progress({"step": st.step, "total_steps": total_steps, "tokens": st.tokens,
                      "tokens_per_s": (st.tokens - tok_start) / elapsed, "loss": float(losses[:, 0].sum()),
                      "l0": sum(l0s) / n, "fvu": sum(fvus) / n})
    if st.step == 0:
        raise IclError(f"the dataset {cfg.dataset!r} yielded no training tokens; check --dataset")

    # Fold the input scale into the weights, then measure on held-out tokens.
    for i, d in enumerate(dicts):
        d.fold_normalisation(float(st.n_in[i]), float(st.n_out[i]))
        d.eval()
    if grp.leader:
        metrics = evaluate(hm, lm.tokenizer, dicts, reads, eval_chunks, device, rows=rows, targets=eval_targets)
    else:  # rank 0 evaluates and publishes
        metrics = [{} for _ in dicts]
    out = []
    for i, ((site, layer), d) in enumerate(zip(members, dicts)):
        dead = (st.tokens - st.last_fired[i]) > dead_window
        freq = st.late_counts[i].double() / max(st.late_tokens, 1)
        m = dict(metrics[i], dead_fraction=float(dead.float().mean()), resampled=int(st.resampled[i]),
                 steps=st.step, tokens=st.tokens, input_scale=float(st.n_in[i]))
        out.append(Trained(layer, d.cpu(), m, st.curves[i], torch.log10(freq + 1e-10).float(),
                           {**cfg.params(layer), "site": site}, site))
    return out


def make_optimizer(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam (β 0.9, 0.999) over all dictionaries' parameters: the fused kernel on CPU and CUDA (one
    pass per tensor; 2-3x faster than the per-tensor loop on CPU), multi-tensor elsewhere."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=fused, foreach=None if fused else True)


def _input_scale(x: Tensor, d_model: int) -> Tensor:
    """[n] the factor √d / mean ‖x‖ of each dictionary's input x [N, n, d] (SPEC §9)."""
    return torch.stack([math.sqrt(d_model) / x[:, i].float().contiguous().norm(dim=-1).mean().clamp_min(1e-12)
                        for i in range(x.shape[1])]).cpu()


def init_generator(seed: int, site: str, layer: int) -> torch.Generator:
    """The generator of one dictionary's initialisation and resampling: a function of the seed,
    the site and the layer only (all three are in the artifact's key)."""
    import hashlib

    digest = hashlib.sha256(f"train-sae init {seed} {site} {layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _identity(cfg: TrainConfig) -> str:
    import hashlib
    import json

    p = cfg.params(-1)
    p["layers"] = cfg.layers
    p["init"] = "per-layer generators"  # checkpoints of the shared generator do not resume here
    return hashlib.sha256(json.dumps(p, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save(work_dir, dicts, opt, g_data, g_init, st: _State, buf: ShuffleBuffer, src: ActivationSource, identity: str) -> None:
    tensors = {f"sae{i}.{k}": v for i, d in enumerate(dicts) for k, v in d.state_dict().items()}
    tensors.update(ckpt.optimizer_tensors(opt))
    tensors.update({"rng.data": g_data.get_state(), **{f"rng.init.{i}": g.get_state() for i, g in enumerate(g_init)}})
    tensors.update(st.to_tensors())
    tensors.update({f"buf.{k}": v for k, v in buf.state().items()})
    meta = {"step": st.step, "tokens": st.tokens, "late_tokens": st.late_tokens, "position": src.position,
            "exhausted": buf.exhausted, "identity": identity}
    ckpt.save(work_dir, tensors, meta)


def _nan_error(work_dir: Path | None, step: int) -> IclError:
    if work_dir is None:
        return IclError(f"the loss became NaN at step {step}; lower --lr (or --l1) and rerun")
    if ckpt.step_of(work_dir) == step:
        ckpt.drop_latest(work_dir)  # written at the start of this step: its weights gave the NaN
    kept = ckpt.step_of(work_dir)
    where = f"kept the last good checkpoint (step {kept}) in {work_dir}" if kept is not None else "no checkpoint was written yet"
    return IclError(f"the loss became NaN at step {step}; {where}; lower --lr (or --l1) and rerun with --resume")


@torch.no_grad()
def _resample(dicts, opt, buf: ShuffleBuffer, st: _State, n_in: Tensor, n_out: Tensor, gens: list[torch.Generator]) -> None:
    """Point features silent since the last resample at inputs the dictionary reconstructs badly."""
    x, t = buf.x, buf.t
    if x is None or x.shape[0] == 0:
        return
    x = x[:4096]
    t = t[:4096] if t is not None else None
    for i, d in enumerate(dicts):
        dead = (~st.fired_since_resample[i]).nonzero().squeeze(1)
        st.fired_since_resample[i].zero_()
        if len(dead) == 0:
            continue
        xi = x[:, i].float() * n_in[i]
        ti = (t[:, i].float() if t is not None else x[:, i].float()) * n_out[i]
        err = (ti - d(xi)).pow(2).sum(-1)
        pick = torch.multinomial(err.cpu().double() + 1e-12, len(dead), replacement=True, generator=gens[i]).to(xi.device)
        direction = ti[pick] - d(xi[pick])
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = st.fired_since_resample[i].new_ones(d.cfg.d_sae, dtype=torch.bool)
        alive[dead.cpu()] = False
        enc_norm = float(d.W_enc.norm(dim=0)[alive.to(d.W_enc.device)].mean()) * 0.2 if alive.any() else 0.2
        idx = dead.to(d.W_dec.device)
        d.reinit_features(idx, direction, enc_norm)
        _reset_adam(opt, d, idx)
        st.resampled[i] += len(dead)


def _reset_adam(opt: torch.optim.Optimizer, d: Dictionary, idx: Tensor) -> None:
    """Zero the Adam moments of the resampled features (every tensor axis of size d_sae)."""
    for p in d.parameters():
        s = opt.state.get(p)
        if not s:
            continue
        for name in ("exp_avg", "exp_avg_sq"):
            m = s[name]
            if m.dim() == 2 and m.shape[1] == d.cfg.d_sae:
                m[:, idx] = 0
            elif m.dim() >= 1 and m.shape[0] == d.cfg.d_sae:
                m[idx] = 0
