"""Reference computations for the formula tests, written without the library's own helpers.

Everything here goes straight through Hugging Face (`model(...)`, a forward pre-hook on a decoder
block) and plain torch, so a test that compares the library with these functions fails when a
formula of the library is wrong, not when both share a bug.
"""

from __future__ import annotations

import torch
from torch import Tensor


def blocks(model) -> list:
    """The decoder blocks of a Gemma-style HF causal LM."""
    return list(model.model.layers)


def word_tokens(tokenizer, text: str) -> list[str]:
    """Token strings of ``text`` with the BOS the library adds."""
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def pad(rows: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids, mask


def logits_with_added(model, ids: Tensor, mask: Tensor, layer: int, vec: Tensor, where: list[int]) -> Tensor:
    """Logits of a full HF pass with ``vec`` [D] added to the input of block ``layer`` (resid_pre)
    at position ``where[b]`` of each row."""

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        add = torch.zeros_like(h)
        for b, p in enumerate(where):
            add[b, p] = add[b, p] + vec.to(h.dtype)
        h = h + add
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = blocks(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        handle.remove()


def hidden_states(model, ids: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    """HF's own resid_pre of every layer (hidden_states[l] is the input of block l)."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


def summed_nll(logits: Tensor, targets: list[list[tuple[int, int]]]) -> Tensor:
    """Mean over rows of Σ −log p(token | logits at position) over that row's (position, token)."""
    per_row = []
    for b, pairs in enumerate(targets):
        total = logits.new_zeros(())
        for pos, tok in pairs:
            total = total - torch.log_softmax(logits[b, pos].double(), -1)[tok].to(total.dtype)
        per_row.append(total)
    return torch.stack(per_row).mean()
