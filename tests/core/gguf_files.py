"""Tiny GGUF files written the way llama.cpp's converter writes them, from a tiny HF model.

    model = reference_model("llama")                      # tiny random *ForCausalLM, byte-level vocabulary
    write_gguf(model, path)                               # F32 tensors, llama.cpp names and conventions
    write_gguf(model, path, qtype=GGMLQuantizationType.Q8_0)

Written independently of icl (and of transformers' reader): the tensor names of the GGUF spec,
llama.cpp's q/k row permutation for the Llama family (rotary pairs interleaved), the 1 + w
RMSNorm weights of Gemma, and a byte-level BPE vocabulary in the metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.core.tiny_models import tiny_config

MERGES = ("h e", "l l", "he ll", "Ġ w")
MERGED = tuple(m.replace(" ", "") for m in MERGES)
SPECIALS = ("<s>", "</s>")
"""Control tokens after the 256 byte tokens and the merged ones: BOS and EOS."""
BOS, EOS = 256 + len(MERGED), 257 + len(MERGED)
VOCAB = 256 + len(MERGED) + len(SPECIALS)


def byte_tokens() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (its bytes_to_unicode table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def reference_model(family: str, n_layers: int = 2, d_model: int = 48, seed: int = 0):
    """A random model of ``family`` sized for the GGUF vocabulary (weights not all alike)."""
    import transformers as tr

    cfg = tiny_config(family, n_layers=n_layers, d_model=d_model)
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = VOCAB, BOS, EOS, EOS
    cfg.tie_word_embeddings = family in ("gemma", "gemma2")
    torch.manual_seed(seed)
    model = tr.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases start constant; make every weight distinct
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows: per head, the two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, family: str) -> dict[str, np.ndarray]:
    """The model's weights under GGUF names, converted the way llama.cpp stores them."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down",
             "post_attention_layernorm": "ffn_norm"}
    if family == "phi3":
        names.update({"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"})
    else:
        names.update({"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                      "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"})
    if family == "gemma2":
        names.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            for suffix in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{suffix}"
                if key not in sd:
                    continue
                w = sd[key]
                if family in ("llama", "mistral") and gg in ("attn_q", "attn_k"):
                    w = _permute(w, cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads)
                out[f"blk.{i}.{gg}.{suffix}"] = w
    if family in ("gemma", "gemma2"):  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
        out = {k: v + 1 if k.endswith("norm.weight") else v for k, v in out.items()}
    return out


def write_gguf(model, path: Path, family: str | None = None, qtype=None, arch: str | None = None,
               name: str = "tiny") -> Path:
    """Write ``model`` as a GGUF file (F32 tensors, or 2-D weights quantized to ``qtype``)."""
    import gguf

    family = family or model.config.model_type
    arch = arch or ("llama" if family == "mistral" else family)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if family in ("gemma", "gemma2"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(byte_tokens() + list(MERGED) + list(SPECIALS))
    w.add_token_types([1] * (256 + len(MERGED)) + [3] * len(SPECIALS))
    w.add_token_merges(list(MERGES))
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_pad_token_id(EOS)
    for tname, arr in gguf_tensors(model, family).items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype is not None and arr.ndim == 2 and arr.shape[1] % 32 == 0:
            w.add_tensor(tname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
