"""Where each supported architecture keeps its decoder blocks, attention, MLP and norms.

The six sites of SPEC §1 are defined by what a block adds to the residual stream. Every family
here has the same pre-norm block shape,

    resid_mid  = resid_pre + attn_out        attn_out = [post-attn norm](attn(norm1(resid_pre)))
    resid_post = resid_mid + mlp_out         mlp_out  = [post-mlp norm](mlp(mlp_in)),  mlp_in = norm2(resid_mid)

so one small table per family (module names relative to the model or to a block) is all the
hook code needs. ``attn_out`` / ``mlp_out`` name the *last* module of each branch, whose output
is exactly what is added: Gemma-2's post-attention / post-feedforward norms, Phi-3's residual
dropouts (identity in eval mode, but the last module all the same).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from icl_cli.core.errors import IclError


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths for one family (``blocks``/``final_norm``/``embed`` from the model root)."""

    family: str
    """HF ``config.model_type``."""
    blocks: str
    """The ModuleList of decoder blocks."""
    final_norm: str
    """The norm applied after the last block (its input is ``resid_post[-1]``)."""
    embed: str
    """The token embedding."""
    attn: str
    """Attention module, relative to a block."""
    attn_out: str
    """Last module of the attention branch: its output is what is added to the stream."""
    mlp_norm: str
    """The pre-MLP norm: its output is ``mlp_in``."""
    mlp: str
    """The MLP module: its input is ``mlp_in``."""
    mlp_out: str
    """Last module of the MLP branch: its output is what is added to the stream."""


def _llama_like(family: str) -> ArchSpec:
    return ArchSpec(
        family=family,
        blocks="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        attn="self_attn",
        attn_out="self_attn",
        mlp_norm="post_attention_layernorm",
        mlp="mlp",
        mlp_out="mlp",
    )


ARCHS: dict[str, ArchSpec] = {
    "gemma": _llama_like("gemma"),
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "gemma2": ArchSpec(
        family="gemma2",
        blocks="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        attn="self_attn",
        attn_out="post_attention_layernorm",  # Gemma-2 normalises the attention output ...
        mlp_norm="pre_feedforward_layernorm",
        mlp="mlp",
        mlp_out="post_feedforward_layernorm",  # ... and the MLP output before adding them
    ),
    "phi3": ArchSpec(
        family="phi3",
        blocks="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        attn="self_attn",
        attn_out="resid_attn_dropout",
        mlp_norm="post_attention_layernorm",
        mlp="mlp",
        mlp_out="resid_mlp_dropout",
    ),
    "gpt2": ArchSpec(
        family="gpt2",
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        attn="attn",
        attn_out="attn",  # GPT2Attention ends with c_proj + resid_dropout
        mlp_norm="ln_2",
        mlp="mlp",
        mlp_out="mlp",
    ),
}

FAMILIES = tuple(ARCHS)


def model_family(model: nn.Module) -> str:
    """The family key of a HF causal LM (its ``config.model_type``)."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in ARCHS:
        raise IclError(
            f"unsupported architecture {family!r}; hook sites are defined for {', '.join(FAMILIES)}"
        )
    return family


def arch_of(model: nn.Module) -> ArchSpec:
    return ARCHS[model_family(model)]


@dataclass(frozen=True)
class BlockParts:
    """The modules of one decoder block that carry hooks."""

    block: nn.Module
    attn_out: nn.Module
    mlp: nn.Module
    mlp_out: nn.Module


@dataclass(frozen=True)
class Located:
    """Every hookable module of a model, found once."""

    spec: ArchSpec
    blocks: list[BlockParts]
    final_norm: nn.Module
    embed: nn.Module


def locate(model: nn.Module) -> Located:
    """Find the blocks, branch outputs and final norm of ``model`` (a HF ``*ForCausalLM``)."""
    spec = arch_of(model)
    blocks = model.get_submodule(spec.blocks)
    n_layers = model.config.num_hidden_layers
    parts = [
        BlockParts(
            block=b,
            attn_out=b.get_submodule(spec.attn_out),
            mlp=b.get_submodule(spec.mlp),
            mlp_out=b.get_submodule(spec.mlp_out),
        )
        for b in list(blocks)[:n_layers]
    ]
    return Located(
        spec=spec,
        blocks=parts,
        final_norm=model.get_submodule(spec.final_norm),
        embed=model.get_submodule(spec.embed),
    )
