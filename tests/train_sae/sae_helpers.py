"""A tiny random Gemma with the toy word-level tokenizer, for trainer and CLI tests (no download)."""

from __future__ import annotations

import types
from pathlib import Path

import torch


def tiny_lm(n_layers: int = 2, d_model: int = 32, seed: int = 0):
    import transformers as tr

    from icl_cli.core.tasks import builtin_tasks
    from icl_cli.zoo.toy_icl import build_tokenizer

    tok = build_tokenizer(builtin_tasks())
    conf = tr.GemmaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                          num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=2,
                          head_dim=d_model // 2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
    conf._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tr.GemmaForCausalLM(conf).eval()
    model.requires_grad_(False)
    return types.SimpleNamespace(model=model, tokenizer=tok, name="tiny", n_layers=n_layers, d_model=d_model,
                                 device=torch.device("cpu"))


def save_tiny(path: Path, **kw) -> Path:
    lm = tiny_lm(**kw)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
