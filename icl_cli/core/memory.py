"""Peak memory of `clean` and `train-sae`, computed from shapes before anything heavy runs.

(The circuit's estimate is icl_cli/circuit/estimate.py; both use the per-block coefficients
defined here.) Every figure is in bytes. Notation: m bytes per model element (its dtype), f = 4
(float32: dictionaries, their optimiser, losses), n layers, D = d_model, M = d_mlp, H heads,
V vocabulary, F dictionary width, J = n_first answer tokens, B·P tokens of a batch.

A block run under autograd keeps, per token, K(P) = C_D·D + C_M·M + C_A·H·P elements of the
model's dtype for its backward (estimate.py: fitted on the toy model, checked on Gemma-2), plus,
when the dtype is narrower than float32 (u = f, else u = 0), the float32 copies its norms and
softmax make: u·(4·D + H·P) bytes. A block run without autograd holds its temporaries only
while it runs: T(P) = 6·D + 3·M + 2·H·P elements per token (q/k/v/o and norm outputs, the MLP's
gate/up/act, the attention scores and softmax).

clean (one task; SPEC §5, icl_cli/clean/cleaning.py):
    resident  weights n_params·m + the SAE (2·D·F + 3·F + D)·f
    caches    resid_pre[l] of the training, held-out and validation batches, kept for the task:
              (B_tr + B_ho + B_val)·P·D·m
    step      blocks ≥ l under autograd, B_tr·P·(n − l)·(K(P)·m + u·(4·D + H·P)); the answer
              logits, their float32 copy (u bytes) and log-softmax, with the gradients of
              each: 2·B_tr·J·V·(m + f + u); the block outputs and their
              gradients 2·B_tr·P·D·m; θ and Adam 4·F·f
    score     a held-out pass without autograd that unembeds only the answer positions: the last
              block's output B_ho·P·D·m, one block's temporaries B_ho·P·T(P)·m, the answer rows
              read for the metrics B_ho·J·V·(m + f + u)
    working   caches + max(step, score)

train-sae (SPEC §9, icl_cli/train_sae/trainer.py, data.py, evaluate.py):
    resident  weights; per dictionary its parameters p, their gradients and Adam's two moments
              4·p·f, p = (d_in + d_out)·F + 3·F + d_out
    buffer    capacity C = buffer_batches·batch_tokens rows of n_dict·(d_in [+ d_out]) elements
              in the store dtype (bfloat16 on a GPU, float32 on the CPU); a refill concatenates then
              permutes, so it briefly holds 2·C rows
    forward   one activation batch of R = min(64, batch_tokens/ctx) chunks of ctx tokens without
              autograd: R·ctx·T(ctx)·m, plus the reads 3·R·ctx·n_dict·(d_in + d_out)·m
    step      per dictionary batch_tokens·(C_F[arch]·F + 8·(d_in + d_out))·f: pre-activations,
              activations, masks and their gradients (C_F an upper bound per architecture:
              measured on the CPU, a gated step kept 7 and a top-k step 4 per token and feature)
    eval      R·ctx tokens: the last block's output R·ctx·D·m, one block's temporaries, the
              encoding R·ctx·(3·F + 2·d_out)·f, and the cross-entropy of c = min(R·ctx, 512)
              scored positions at a time (evaluate.CE_CHUNK): their logits, float32 copy and
              log-softmax c·V·(m + u + f)
    working   dictionaries + max(2·buffer + forward, buffer + step, buffer + eval)

The coefficients were checked against measured peaks on scaled-down random Gemma models, in
float32 and bfloat16 (benchmarks/memory_table.py, tests/scale/test_memory_estimates.py); they are
meant to be an upper bound within about 2×, not an exact figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30
CE_CHUNK = 512
"""Scored positions train-sae's evaluation unembeds at once (icl_cli/train_sae/evaluate.py)."""
F4 = 4
C_D, C_M, C_A = 10, 4, 3
"""Elements a block keeps for backward per token: ×d_model, ×d_mlp, ×heads·P (shared with the
circuit estimate, icl_cli/circuit/estimate.py)."""
C_F = {"standard": 8, "gated": 12, "jumprelu": 10, "topk": 6}
"""float32 elements per token and feature of one training step (see the module docstring)."""


@dataclass(frozen=True)
class ModelShape:
    n_params: int
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def of(cls, config, dtype_bytes: int) -> "ModelShape":
        """From a HF config (parameters counted on the meta device: nothing is allocated)."""
        import torch
        import transformers as tr

        with torch.device("meta"):
            n_params = sum(p.numel() for p in tr.AutoModelForCausalLM.from_config(config).parameters())
        g = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), 0)  # noqa: E731
        d = g("hidden_size", "n_embd")
        return cls(n_params, g("num_hidden_layers", "n_layer"), d, g("intermediate_size", "n_inner") or 4 * d,
                   g("num_attention_heads", "n_head"), g("vocab_size"), dtype_bytes)

    @property
    def upcast(self) -> int:
        """Bytes per element of a float32 copy that exists only when the model's dtype is narrower."""
        return F4 if self.dtype_bytes < F4 else 0

    @property
    def rows_bytes(self) -> int:
        """Bytes per element of logits rows read for a loss: the rows, their float32 copy (a no-op
        in float32) and their log-softmax."""
        return self.dtype_bytes + F4 + self.upcast

    def saved(self, P: int) -> int:
        """K(P): elements a block keeps per token for its backward."""
        return C_D * self.d_model + C_M * self.d_mlp + C_A * self.n_heads * P

    def saved_bytes(self, P: int) -> int:
        """Bytes a block keeps per token for its backward: K(P) in the model's dtype, and in a
        narrower dtype the float32 copies its norms and softmax make, u·(4·D + H·P)."""
        return self.saved(P) * self.dtype_bytes + self.upcast * (4 * self.d_model + self.n_heads * P)

    def temporaries(self, P: int) -> int:
        """T(P): elements a block holds per token while it runs without autograd."""
        return 6 * self.d_model + 3 * self.d_mlp + 2 * self.n_heads * P


class Phased:
    """Resident bytes plus working bytes per phase (``resident``, ``phases`` fields of a dataclass)."""

    resident: int
    phases: dict[str, int]

    @property
    def phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def total(self) -> int:
        return self.resident + self.peak

    def gib_json(self) -> dict:
        return {"resident_gib": self.resident / GIB, "peak_gib": self.peak / GIB, "total_gib": self.total / GIB,
                "phase": self.phase, "phases_gib": {k: v / GIB for k, v in self.phases.items()}}


@dataclass
class Memory(Phased):
    resident: int
    """Bytes of weights (model, and for clean the SAE)."""
    phases: dict[str, int]
    """Working bytes of each phase (beyond ``resident``), the largest being the peak."""
    notes: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**self.gib_json(), **self.notes}


def sae_params(d_in: int, F: int, d_out: int | None = None) -> int:
    """Parameters of one dictionary: encoder, decoder, and up to three per-feature vectors."""
    d_out = d_out or d_in
    return (d_in + d_out) * F + 3 * F + d_out


def clean_memory(s: ModelShape, d_sae: int, layer: int, P: int, n_train: int = 24, n_heldout: int = 32,
                 n_val: int = 24, n_first: int = 2) -> Memory:
    """One task of `clean` (module docstring) for 0-shot prompts of P tokens (padded)."""
    m, D, V, J = s.dtype_bytes, s.d_model, s.vocab, n_first
    caches = (n_train + n_heldout + n_val) * P * D * m
    step = (n_train * P * (s.n_layers - layer) * s.saved_bytes(P) + 2 * n_train * J * V * s.rows_bytes
            + 2 * n_train * P * D * m + 4 * d_sae * F4)
    score = n_heldout * P * (D + s.temporaries(P)) * m + n_heldout * J * V * s.rows_bytes
    resident = s.n_params * m + sae_params(D, d_sae) * F4
    return Memory(resident, {"step": caches + step, "score": caches + score},
                  {"P": P, "n_train": n_train, "n_heldout": n_heldout, "layer": layer, "d_sae": d_sae})


def train_sae_memory(s: ModelShape, width: int, n_dicts: int = 1, transcoder: bool = False, arch: str = "gated",
                     batch_tokens: int = 4096, buffer_batches: int = 16, ctx: int = 128,
                     store_bytes: int | None = None) -> Memory:
    """One `train-sae` run of ``n_dicts`` dictionaries sharing the forward passes (module docstring).
    store_bytes: bytes per buffered activation (default m: bfloat16 on a GPU; the CPU stores f)."""
    m, D, V, F = s.dtype_bytes, s.d_model, s.vocab, width
    d_io = 2 * D if transcoder else D  # d_in + d_out per buffered row and dictionary
    store = store_bytes or m
    dicts = n_dicts * 4 * sae_params(D, F) * F4
    buffer = buffer_batches * batch_tokens * n_dicts * d_io * store
    R = max(1, min(64, batch_tokens // ctx))
    tok = R * ctx
    forward = tok * s.temporaries(ctx) * m + 3 * tok * n_dicts * 2 * D * m
    step = n_dicts * batch_tokens * (C_F.get(arch, max(C_F.values())) * F + 8 * 2 * D) * F4
    ce_rows = min(tok, CE_CHUNK)
    evaluation = (tok * D * m + ce_rows * V * s.rows_bytes + tok * (3 * F + 2 * D) * F4
                  + tok * s.temporaries(ctx) * m)
    phases = {"buffer": dicts + 2 * buffer + forward, "step": dicts + buffer + step, "eval": dicts + buffer + evaluation}
    return Memory(s.n_params * m, phases, {"width": F, "n_dicts": n_dicts, "arch": arch, "batch_tokens": batch_tokens,
                                           "buffer_batches": buffer_batches, "ctx": ctx, "eval_rows": R})
