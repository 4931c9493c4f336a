"""Tiny random models of every supported family, built from a config (no download).

    from tests.core.tiny_models import FAMILIES, tiny_model
    model = tiny_model("gemma2")            # eval mode, float32, requires_grad off
    model = tiny_model("llama", dtype=torch.float64, n_layers=3)

d_model 32-64, 2-3 layers, vocab 97: fast enough to build dozens per test run.
"""

from __future__ import annotations

import torch

FAMILIES = ("gemma", "gemma2", "llama", "mistral", "qwen2", "phi3", "gpt2")

VOCAB = 97

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str, n_layers: int = 3, d_model: int = 48):
    """A small ``transformers`` config of ``family`` (a ``config.model_type``)."""
    import transformers as tr

    common = {**_COMMON, "num_hidden_layers": n_layers, "hidden_size": d_model, "intermediate_size": 2 * d_model}
    if family == "gemma":
        return tr.GemmaConfig(**common, head_dim=d_model // 4)
    if family == "gemma2":
        # sliding_window smaller than the test prompts, so both layer types are exercised
        return tr.Gemma2Config(**common, head_dim=d_model // 4, sliding_window=4, query_pre_attn_scalar=16)
    if family == "llama":
        return tr.LlamaConfig(**common)
    if family == "mistral":
        return tr.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tr.Qwen2Config(**common)
    if family == "phi3":
        return tr.Phi3Config(**common)
    if family == "gpt2":
        return tr.GPT2Config(
            vocab_size=VOCAB, n_positions=128, n_embd=d_model, n_layer=n_layers, n_head=4,
            bos_token_id=1, eos_token_id=2,
        )
    raise ValueError(f"no tiny config for family {family!r}; known: {FAMILIES}")


def tiny_model(family: str, dtype: torch.dtype = torch.float32, n_layers: int = 3, d_model: int = 48, seed: int = 0):
    """A random ``*ForCausalLM`` of ``family`` in eval mode with frozen parameters."""
    import transformers as tr

    config = tiny_config(family, n_layers=n_layers, d_model=d_model)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tr.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model
