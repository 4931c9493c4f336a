"""The Dictionary interface shared by SAEs and transcoders, and the architecture registry.

A dictionary maps a site's activations x [.., d_in] to feature activations a [.., d_sae] and
back to a reconstruction x̂ [.., d_out] (d_out = d_in for an SAE; a transcoder reads `mlp_in`
and writes `mlp_out`):

    pre = encode_pre(x)       # [.., d_sae] pre-activations, input normalisation included
    a   = activate(pre)       # the architecture's activation (ReLU, top-k, JumpReLU, gate)
    x̂   = decode(a)           # [.., d_out] = a @ W_dec + b_dec, de-normalisation included

Weights are stored in the model's space: the input normalisation used in training
(scale x so its mean norm is √d_in, SPEC §9) is folded into W_enc, W_dec and b_dec before
saving, so every consumer can use `W_dec [d_sae, d_out]` as directions in the residual stream.
One file per architecture (`standard.py`, `gated.py`, `topk.py`, `jumprelu.py`) registers a
subclass under its SAELens architecture name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from icl_cli.core.errors import IclError

SITES = ("resid_pre", "attn_out", "transcoder")


@dataclass
class DictConfig:
    """What a dictionary is and where it belongs in a model."""

    d_in: int
    """Width of the activations read (d_model for every site we train)."""
    d_sae: int
    """Number of features."""
    d_out: int = 0
    """Width of the reconstruction; 0 means d_in (an SAE). Transcoders may differ."""
    arch: str = "gated"
    """gated | standard | topk | jumprelu."""
    model: str | None = None
    """Model the dictionary was trained on (preset, HF id or path)."""
    site: str = "resid_pre"
    """resid_pre | attn_out | transcoder (mlp_in -> mlp_out)."""
    layer: int | None = None
    """Decoder block (0-based)."""
    hook_name: str | None = None
    """The site in the source library's naming (e.g. blocks.12.hook_resid_pre), if imported."""
    dtype: str = "float32"
    """Parameter dtype."""
    normalisation: str = "folded"
    """How input scaling is handled: folded into the weights (ours) or none (imported as-is)."""
    k: int = 0
    """Active features per token for top-k."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens convention; False for transcoders)."""
    extra: dict = field(default_factory=dict)
    """Provenance kept verbatim from the source (release, sae_id, file format)."""

    def __post_init__(self) -> None:
        if self.d_out <= 0:
            self.d_out = self.d_in
        if self.d_in <= 0 or self.d_sae <= 0:
            raise IclError(f"dictionary sizes must be positive (d_in={self.d_in}, d_sae={self.d_sae})")
        if self.arch not in ARCHS and ARCHS:
            raise IclError(f"unknown architecture {self.arch!r}; use one of {', '.join(sorted(ARCHS))}")
        if self.arch == "topk" and self.k <= 0:
            raise IclError("a top-k dictionary needs k > 0; pass --k")
        if self.site == "transcoder" or self.d_out != self.d_in:
            self.apply_b_dec_to_input = False

    @property
    def is_transcoder(self) -> bool:
        return self.site == "transcoder"

    def to_dict(self) -> dict:
        return asdict(self)


class LossParts(NamedTuple):
    """One training step's loss and what the trainer logs from it."""

    loss: Tensor
    """Scalar to minimise."""
    mse: Tensor
    """Summed squared error per token, batch mean (scalar)."""
    sparsity: Tensor
    """The sparsity penalty before its coefficient (scalar)."""
    aux: Tensor
    """Auxiliary loss (gated reconstruction through the gate, AuxK), coefficient included."""
    fired: Tensor
    """[batch, d_sae] bool, which features fired (a > 0)."""
    recon: Tensor
    """[batch, d_out] reconstruction."""


ARCHS: dict[str, type["Dictionary"]] = {}


def register(name: str) -> Callable[[type["Dictionary"]], type["Dictionary"]]:
    def deco(cls: type[Dictionary]) -> type[Dictionary]:
        cls.arch = name
        ARCHS[name] = cls
        return cls

    return deco


def build(cfg: DictConfig) -> "Dictionary":
    """A freshly initialised dictionary of the configured architecture."""
    if cfg.arch not in ARCHS:
        raise IclError(f"unknown architecture {cfg.arch!r}; use one of {', '.join(sorted(ARCHS))}")
    return ARCHS[cfg.arch](cfg)


class Dictionary(nn.Module):
    """Base class: linear encoder, architecture-specific activation, linear decoder."""

    arch = "base"
    renorm_decoder = False
    """Keep decoder rows at unit norm during training (top-k, JumpReLU)."""
    default_coeff = 1.0
    """Sparsity coefficient used when none is given."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        dt = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_out, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dt))
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder = decoder transpose (Anthropic, April 2024)."""
        w = torch.randn(self.cfg.d_sae, self.cfg.d_out, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        if self.cfg.d_in == self.cfg.d_out:
            self.W_enc.copy_(w.T)
        else:
            e = torch.randn(self.cfg.d_in, self.cfg.d_sae, generator=generator)
            self.W_enc.copy_(e / e.norm(dim=0, keepdim=True))
        if self.has_b_enc:
            self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def reinit_features(self, idx: Tensor, directions: Tensor, enc_norm: float) -> None:
        """Point features `idx` at `directions` [n, d_out] (unit rows): resampling of dead features."""
        d = directions.to(self.W_dec.dtype)
        self.W_dec[idx] = d
        enc = d if self.cfg.d_in == self.cfg.d_out else torch.randn(len(idx), self.cfg.d_in)
        enc = enc / enc.norm(dim=1, keepdim=True)
        self.W_enc[:, idx] = (enc * enc_norm).T.to(self.W_enc.dtype)
        if self.has_b_enc:
            self.b_enc[idx] = 0.0

    @property
    def has_b_enc(self) -> bool:
        return isinstance(getattr(self, "b_enc", None), nn.Parameter)

    # ---- the interface ---------------------------------------------------------------------
    def sae_in(self, x: Tensor) -> Tensor:
        """[.., d_in] input after the SAELens centring (x - b_dec), if this dictionary uses it."""
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode_pre(self, x: Tensor) -> Tensor:
        """[.., d_in] -> [.., d_sae] pre-activations."""
        return self.sae_in(x) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """[.., d_sae] pre-activations -> feature activations (architecture-specific)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """[.., d_in] -> [.., d_sae] feature activations."""
        return self.activate(self.encode_pre(x))

    def decode(self, a: Tensor) -> Tensor:
        """[.., d_sae] -> [.., d_out] reconstruction in model space."""
        return a.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ---- training ----------------------------------------------------------------------------
    def training_loss(
        self, x: Tensor, target: Tensor, coeff: float, dead: Tensor | None = None
    ) -> LossParts:
        """Loss on a batch x [B, d_in] with target [B, d_out] (= x for an SAE)."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self) -> None:
        """Constraints applied after each optimiser step (decoder norms, positive thresholds)."""
        if self.renorm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # ---- normalisation and export ------------------------------------------------------------
    @torch.no_grad()
    def fold_normalisation(self, n_in: float, n_out: float) -> None:
        """Fold the training-time scaling x·n_in (input) and target·n_out (output) into weights.

        Trained on x' = x·n_in, the model-space dictionary is
            pre = (x·n_in - b_dec) @ W_enc + b_enc = (x - b_dec/n_in) @ (n_in·W_enc) + b_enc
            x̂   = (a @ W_dec + b_dec) / n_out
        so W_enc *= n_in, W_dec /= n_out, b_dec /= n_out (n_in = n_out when b_dec is subtracted
        from the input, which holds for every SAE).
        """
        self.W_enc *= n_in
        self.W_dec /= n_out
        self.b_dec /= n_out

    def saelens_arch(self) -> str:
        """The `architecture` string SAELens uses for this dictionary."""
        return self.arch

    def saelens_state(self) -> dict[str, Tensor]:
        """Tensors under SAELens's names."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def load_saelens_state(self, state: dict[str, Tensor]) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise IclError(f"{self.arch} dictionary file lacks tensors {missing}")
        for name, t in own.items():
            if tuple(state[name].shape) != tuple(t.shape):
                raise IclError(f"tensor {name} has shape {tuple(state[name].shape)}, expected {tuple(t.shape)}")
        self.load_state_dict({k: state[k].to(own[k].dtype) for k in own})


def mse_sum(recon: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over features, mean over the batch (scalar)."""
    return (recon.float() - target.float()).pow(2).sum(-1).mean()


def input_scale(mean_norm: float, d: int) -> float:
    """The factor n = √d / mean_norm that gives inputs a mean norm of √d (SPEC §9)."""
    return math.sqrt(d) / max(mean_norm, 1e-12)
