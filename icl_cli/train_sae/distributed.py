"""Data-parallel ``train-sae`` under ``torchrun`` (torch.distributed: NCCL on GPUs, gloo on CPUs).

    torchrun --nproc-per-node 4 -m icl_cli train-sae --model gemma-2-2b --layer 12 --batch-tokens 16384

How the work is split, so that W processes give the result of one process with the same global
batch (``--batch-tokens``), whatever W is (so W is not part of the artifact's key):

1. Activations: each forward batch of ``rows`` chunks is split into W contiguous slices; rank r
   runs the model on slice r only, and the activations are all-gathered in rank order. Every rank
   then holds the same shuffle buffer (same contents, same permutation generator) as a single
   process would: the model forward, the dominant cost, is sharded; the buffer is replicated.
2. Each step's global batch [B] is split the same way: rank r computes the dictionaries' loss and
   gradients on its B_r tokens; gradients are summed with weights B_r / B (all-reduce), which is
   the gradient of the mean loss over the global batch (every loss is a per-token mean). The
   dictionaries start identical (broadcast from rank 0) and take identical Adam steps.
3. Metrics (loss, MSE, firing counts, hence L0, dead features, sparsity) are all-reduced; the
   dead-feature masks and resampling then agree on every rank.
4. Rank 0 alone writes checkpoints, evaluates and publishes the artifact; every rank reads the
   checkpoint on ``--resume`` (the store must be on a file system all ranks share).
5. At exit the process group is destroyed while the interpreter is still whole (``shutdown``,
   from atexit), which joins gloo's worker threads. Nothing may keep the group alive past that:
   ``torch.distributed.nn`` binds ``group.WORLD`` as a default argument when it is imported, and
   transformers imports it while loading a model, so it is imported here *before* the group
   exists. Otherwise the group outlives ``destroy_process_group``, a gloo worker thread frees its
   last collective's tensors during interpreter shutdown, cannot take the GIL, and the rank
   aborts ("terminate called without an active exception", exit -6) once in a few runs.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from icl_cli.core.errors import IclError
from icl_cli.train_sae.data import ActivationSource


@dataclass(frozen=True)
class Group:
    """This process's place in the data-parallel group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env() -> Group:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT); a no-op
    group without it. On GPUs each process uses cuda:LOCAL_RANK."""
    import torch.distributed as dist

    if not launched():
        return Group()
    if not dist.is_initialized():
        import torch.distributed.nn  # noqa: F401  - before the group exists: point 5 of the docstring

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            atexit.register(shutdown)
        except (ValueError, RuntimeError) as exc:
            raise IclError(f"could not join the torchrun process group: {exc}; launch with `torchrun --nproc-per-node N -m icl_cli ...`") from exc
    return current()


def shutdown() -> None:
    """Destroy the process group (if any) while the interpreter is whole: gloo joins its threads."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def backend_threads() -> list[str]:
    """Names of this process's gloo/NCCL threads still running (Linux; empty elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as f:
                name = f.read().strip()
        except OSError:
            continue
        if "gloo" in name or "nccl" in name.lower():
            names.append(name)
    return sorted(names)


def current() -> Group:
    """The group of the running process (Group() when torch.distributed is not initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def local_rows(n: int, grp: Group) -> tuple[slice, float, bool]:
    """(this rank's rows of a global batch of n, its gradient weight, whether it reports counts).

    n ≥ W: contiguous slices, weight B_r / n. n < W (a tiny last batch): every rank takes all n
    rows with weight 1 / W, and only rank 0 reports firing counts.
    """
    if grp.world == 1:
        return slice(0, n), 1.0, True
    if n < grp.world:
        return slice(0, n), 1.0 / grp.world, grp.leader
    lo, hi = n * grp.rank // grp.world, n * (grp.rank + 1) // grp.world
    return slice(lo, hi), (hi - lo) / n, True


def all_reduce_grads(params: list[Tensor], weight: float, grp: Group) -> None:
    """p.grad ← Σ_ranks weight_r · p.grad_r for every parameter (one flat all-reduce)."""
    import torch.distributed as dist

    if not grp.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    grads = [gr.to_dense() if gr.layout != torch.strided else gr for gr in grads]
    flat = torch.cat([gr.reshape(-1).float() for gr in grads]) * weight
    dist.all_reduce(flat)
    at = 0
    for p, gr in zip(params, grads):
        k = gr.numel()
        p.grad = flat[at : at + k].view_as(gr).to(p.dtype)
        at += k


def all_reduce_sum(t: Tensor, grp: Group) -> Tensor:
    """Σ over ranks of ``t`` (returned; ``t`` unchanged)."""
    import torch.distributed as dist

    if not grp.active:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


def broadcast_params(params: list[Tensor], grp: Group) -> None:
    """Copy rank 0's parameter values to every rank (in place)."""
    import torch.distributed as dist

    if not grp.active:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def broadcast_object(obj: Any, grp: Group) -> Any:
    """Rank 0's ``obj`` on every rank (pickled)."""
    import torch.distributed as dist

    if not grp.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(x: Tensor, grp: Group) -> Tensor:
    """Concatenate each rank's ``x`` [N_r, ...] in rank order: [Σ N_r, ...] on every rank."""
    import torch.distributed as dist

    if not grp.active:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(grp.world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts = [int(s) for s in sizes]
    top = max(counts)
    padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(grp.world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class ShardedSource(ActivationSource):
    """ActivationSource whose forward batches are split over the ranks and all-gathered (point 1).

    Every rank reads the same chunk stream (tokenising is cheap), so positions and resumes agree.
    """

    def __init__(self, *args, group: Group, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def forward_chunks(self, batch: list[list[int]]) -> tuple[Tensor, Tensor | None]:
        W, r = self.group.world, self.group.rank
        mine = batch[len(batch) * r // W : len(batch) * (r + 1) // W]
        has_t = any(o is not None for _, o in self.reads)
        if mine:
            x, t = super().forward_chunks(mine)
        else:
            shape = (0, len(self.reads), self.hm.d_model)
            x = torch.zeros(shape, dtype=self.dtype, device=self.device)
            t = torch.zeros(shape, dtype=self.dtype, device=self.device) if has_t else None
        x = gather_rows(x, self.group)
        t = gather_rows(t, self.group) if has_t else None
        return x, t
