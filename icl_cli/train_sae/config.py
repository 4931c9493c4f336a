"""Settings of one `icl train-sae` run (SPEC §9). Numbers marked *paper* are the authors'."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from icl_cli.core.errors import IclError

SITE_KINDS = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "transcoder"}
TOY = "toy-icl"
ARCH_NAMES = ("gated", "jumprelu", "standard", "topk")
"""The architectures of icl_cli.dictionaries.ARCHS, named without importing it (it needs torch)."""


@dataclass
class TrainConfig:
    model: str = TOY
    """Model preset, HF id or local folder."""
    layers: list[int] = field(default_factory=lambda: [0])
    """Blocks to train a dictionary for; all of them share the same forward passes."""
    site: str = "resid"
    """resid (resid_pre) | attn (attn_out) | transcoder (mlp_in -> mlp_out)."""
    arch: str = "gated"
    """gated (*paper*) | standard | topk | jumprelu."""
    width: int | None = None
    """Features per dictionary; None means 16 × d_model (*paper*: 32768 for Gemma-1 2B)."""
    k: int = 32
    """Active features per token (top-k only)."""
    l1: float | None = None
    """Sparsity coefficient; None picks the architecture's default for our loss scale
    (squared error summed over d on inputs of mean norm √d; the *paper*'s 2e-5 was for theirs)."""
    lr: float = 4e-4
    """Adam learning rate (*paper* 4e-4)."""
    tokens: int = 0
    """Training tokens per dictionary; 0 means 2M for the toy model, 300M (*paper*) otherwise."""
    batch_tokens: int = 4096
    """Tokens per optimiser step."""
    ctx: int = 128
    """Context length of the activation chunks (*paper* 128)."""
    dataset: str | None = None
    """HF dataset name (streamed), or local .txt/.jsonl files/folder; None: the toy model's own
    task prompts for toy-icl, FineWeb (*paper*) otherwise."""
    buffer_batches: int = 16
    """Shuffle buffer size, in batches."""
    eval_tokens: int = 16384
    """Held-out tokens for the final metrics."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: never)."""
    seed: int = 0
    """Seed of initialisation, data order and the toy corpus."""

    def __post_init__(self) -> None:
        if self.site not in SITE_KINDS:
            raise IclError(f"unknown site {self.site!r}; use resid, attn or transcoder")
        if self.width is not None and self.width <= 0:
            raise IclError(f"--width must be positive (got {self.width}); the default is 16 × d_model")
        if self.arch == "topk" and self.k <= 0:
            raise IclError("--k must be positive for a top-k SAE")
        for name in ("tokens", "batch_tokens", "ctx", "buffer_batches", "eval_tokens"):
            if getattr(self, name) < 0 or (name != "tokens" and getattr(self, name) == 0):
                raise IclError(f"--{name.replace('_', '-')} must be positive")
        if self.lr <= 0:
            raise IclError("--lr must be positive")
        if self.l1 is not None and self.l1 < 0:
            raise IclError("--l1 must be ≥ 0")
        if not self.layers:
            raise IclError("give at least one --layer")

    @property
    def is_toy(self) -> bool:
        return self.model == TOY

    def resolved(self, d_model: int, n_layers: int) -> "TrainConfig":
        """A copy with every default filled in from the model, checked against it (torch is
        imported only to read an architecture's default coefficient, when --l1 is not given)."""
        if self.arch not in ARCH_NAMES:
            raise IclError(f"unknown architecture {self.arch!r}; use one of {', '.join(sorted(ARCH_NAMES))}")
        bad = [l for l in self.layers if not 0 <= l < n_layers]
        if bad:
            raise IclError(f"layer {bad[0]} is out of range: {self.model} has layers 0..{n_layers - 1}")
        c = TrainConfig(**asdict(self))
        c.layers = sorted(set(self.layers))
        c.width = self.width or 16 * d_model
        c.tokens = self.tokens or (2_000_000 if self.is_toy else 300_000_000)
        if self.l1 is None:
            from icl_cli.dictionaries import ARCHS

            c.l1 = ARCHS[self.arch].default_coeff
        if c.dataset is None:
            c.dataset = "tasks" if self.is_toy else "HuggingFaceFW/fineweb"
        if c.arch == "topk" and c.k > c.width:
            raise IclError(f"--k {c.k} exceeds the width {c.width}")
        return c

    def params(self, layer: int) -> dict:
        """The hashed parameters of the artifact for one layer."""
        p = asdict(self)
        p.pop("layers")
        p.pop("checkpoint_every")
        p["layer"] = layer
        if self.arch != "topk":
            p.pop("k")
        return p
