"""Memory and time a circuit will need, computed from shapes before anything heavy runs.

1. Shapes: the model's config (parameter count from a meta-device copy, d_model, d_mlp, heads,
   vocabulary, layers), each dictionary's (d_in, d_sae, d_out), the prompt batch (B prompts of
   P tokens, from the tokenizer alone) and the run's settings.
2. Resident: model weights + dictionary weights.
3. Working memory of each phase (bytes), the largest being the peak:
   clean    forward + backward through every block with every site spliced: per token and
            block the tensors autograd keeps (c_D·D + c_M·d_mlp + c_A·heads·P elements of the
            model's dtype), the logits, and per site a, e and their gradients (float32).
   ig       the same from the first circuit layer on, for min(steps, rows/B)·B rows, one site.
   edges    block l once for the B prompt rows (its graph), and for each of the K = rows/B
            downstream nodes of a chunk (one batched backward over their seeds, edges.py): the
            seed (d_model), the gradients at up to three upstream sites (3·d_model, float32)
            and the backward's temporaries (d_mlp + 2·heads·P).
   sweep    forward passes without gradients (every site encoded once at a time).
4. Time: FLOPs of every pass (2·params·tokens forward, twice that backward; attention
   4·P·D per token and block; 2·(d_in + d_out)·d_sae per token and site), divided by the
   throughput of a short matrix product measured on the device.
The c_* coefficients were fitted on the toy model and checked on a tiny random Gemma-2
(tests/circuit/test_estimate.py compares with measured peaks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

from icl_cli.core.memory import C_A, C_D, C_M, GIB, ModelShape, Phased  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Shapes(ModelShape):
    """The model's shapes (``ModelShape``) and the dictionaries'."""

    dicts: list[tuple[int, int, int]]
    """(d_in, d_sae, d_out) per dictionary."""
    first_layer: int
    """The lowest layer with a dictionary."""

    @classmethod
    def of(cls, config, dicts, dtype_bytes: int) -> "Shapes":
        """From a HF config (parameters counted on the meta device) and the dictionaries."""
        base = ModelShape.of(config, dtype_bytes)
        return cls(**{f.name: getattr(base, f.name) for f in fields(ModelShape)},
                   dicts=[(x.cfg.d_in, x.cfg.d_sae, x.cfg.d_out) for x in dicts.values()],
                   first_layer=min(l for _, l in dicts))


@dataclass
class Estimate(Phased):
    resident: int
    """Bytes of model and dictionary weights."""
    phases: dict[str, int]
    """Working bytes of each phase."""
    flops: float
    seconds: float
    free: int | None = None
    """Free bytes on the device (None: unknown)."""
    notes: dict = field(default_factory=dict)

    def fits(self) -> bool:
        return self.free is None or self.total <= self.free

    def to_json(self) -> dict:
        return {**self.gib_json(), "tflops": self.flops / 1e12, "seconds": self.seconds,
                "free_gib": None if self.free is None else self.free / GIB, "fits": self.fits()}


def estimate(s: Shapes, B: int, P: int, method: str = "atp", ig_steps: int = 10, edge_rows: int = 256,
             edge_nodes: int = 1000, sweep_points: int = 26, throughput: float | None = None,
             free: int | None = None) -> Estimate:
    """Steps 2-4 for B prompts of P tokens."""
    bm, f4 = s.dtype_bytes, 4
    n_sites = len(s.dicts)
    F_max = max(F for _, F, _ in s.dicts)
    site_bytes = sum(2 * (F + d_out) * f4 for _, F, d_out in s.dicts)  # a, e and their gradients, per token
    per_block = (C_D * s.d_model + C_M * s.d_mlp + C_A * s.n_heads * P) * bm  # per token
    logits = s.vocab * (bm + 2 * f4)  # per token: logits, their float copy and gradient
    encode_tmp = 3 * F_max * f4  # per token: pre-activations and gate of the site being encoded
    resident = s.n_params * bm + sum((d_in + d_out) * F * f4 for d_in, F, d_out in s.dicts)

    tokens = B * P
    phases = {"clean": tokens * (s.n_layers * per_block + logits + site_bytes + encode_tmp)}
    if method == "ig":
        rows = min(ig_steps, max(1, edge_rows // B)) * B
        after = s.n_layers - s.first_layer
        phases["ig"] = rows * P * (after * per_block + logits + 3 * (F_max + s.d_model) * f4 + encode_tmp)
    K = max(1, edge_rows // B)
    # block l's graph once for the B rows; per downstream node of a chunk its seed and the
    # gradients at up to three upstream sites, plus the MLP- and attention-sized temporaries of
    # the batched backward
    phases["edges"] = tokens * per_block + K * tokens * (3 * s.d_model * f4
                                                         + (s.d_model + s.d_mlp + 2 * s.n_heads * P) * bm)
    phases["sweep"] = tokens * ((6 * s.d_model + 2 * s.d_mlp + s.n_heads * P) * bm + encode_tmp + 2 * s.vocab * f4)

    fwd_tok = 2 * s.n_params + 4 * P * s.d_model * s.n_layers  # per token, model alone
    dict_tok = sum(2 * (d_in + d_out) * F for d_in, F, d_out in s.dicts)
    flops = 3 * tokens * (fwd_tok + dict_tok)  # clean pass
    if method == "ig":
        flops += n_sites * ig_steps * 3 * tokens * (fwd_tok / 2 + dict_tok / n_sites)
    flops += sweep_points * tokens * (fwd_tok + dict_tok)
    n_rows = min(edge_nodes, 10 * n_sites * 5) + 5 * n_sites  # feature rows (bounded) + error rows
    flops += n_rows * 3 * tokens * (fwd_tok / max(s.n_layers, 1) + dict_tok / max(n_sites, 1))
    tput = throughput or 2e10
    return Estimate(resident, phases, float(flops), float(flops / tput), free,
                    {"B": B, "P": P, "edge_rows": edge_rows, "throughput": tput})


def measure_throughput(device, seconds: float = 0.2) -> float:
    """FLOP/s of float32 matrix products on ``device`` (a short measurement)."""
    import torch

    n = 512 if getattr(device, "type", str(device)) == "cpu" else 4096
    a = torch.randn(n, n, device=device)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        (a @ a).sum().item()
        done += 1
    return 2 * n ** 3 * done / (time.perf_counter() - t0)


def free_memory(device) -> int | None:
    """Free bytes on a CUDA device, or MemAvailable for the CPU; None when unknown."""
    import torch

    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if kind == "cpu":
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def measure_peak(fn, device) -> int:
    """Bytes ``fn()`` needs beyond what is resident: CUDA peak allocation, or on Linux CPUs the rise
    of the process's peak resident set (reset through /proc/self/clear_refs)."""
    import re

    import torch

    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)

    def status(k: str) -> int:
        return int(re.search(rf"{k}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    r0 = status("VmRSS")
    fn()
    return status("VmHWM") - r0
