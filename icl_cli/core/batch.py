"""Tokenised prompt batches with token roles and answer positions.

    batch = encode_prompts(tokenizer, prompts, n_first=2)
    batch.input_ids       # [B, P] right padded
    batch.roles           # [B, P] int8, codes of prompts.ROLE_CODE (0 = no role)
    batch.answer_pos      # [B, n_first] position whose logits predict each answer token (-1: none)
    batch.pair_answer_pos # [B, n_pairs] position predicting each pair's first answer token (-1: none)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from icl_cli.core.prompts import _PRIORITY, ROLE_CODE, ROLES, Prompt
from icl_cli.core.errors import IclError


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [B, P] long
    attention_mask: torch.Tensor  # [B, P] long
    roles: torch.Tensor  # [B, P] int8
    query_arrow: torch.Tensor  # [B] position of the query's separator token
    answer_pos: torch.Tensor  # [B, n_first] long, -1 where the answer is shorter
    answer_ids: torch.Tensor  # [B, n_first] long (0 where absent)
    pair_answer_pos: torch.Tensor  # [B, n_pairs] long, -1 padded
    pair_answer_ids: torch.Tensor  # [B, n_pairs] long

    def role_mask(self, role: str) -> torch.Tensor:
        """[B, P] bool mask of the tokens holding ``role``."""
        if role not in ROLE_CODE:
            raise IclError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        return self.roles == ROLE_CODE[role]

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def answer_mask(self) -> torch.Tensor:
        return self.answer_pos >= 0

    def zero_shot_arrow_mask(self) -> torch.Tensor:
        """[B, P] bool: only the query's arrow token."""
        mask = torch.zeros_like(self.input_ids, dtype=torch.bool)
        mask[torch.arange(len(self)), self.query_arrow] = True
        return mask


def token_roles(offsets: Sequence[tuple[int, int]], segments, n_pairs: int):
    """Per-token role names and, per pair, the token indices of its output.

    A token "holds" a character when start <= char < end. Special tokens have (0, 0) offsets.
    A byte-level BPE may split one character's bytes over two tokens, both holding it: a word's
    role goes to the last of them (the token that completes the word).
    """
    holder, last = {}, {}  # char -> first / last token holding it
    for t, (start, end) in enumerate(offsets):
        for c in range(start, end):
            holder.setdefault(c, t)
            last[c] = t
    roles: list[str | None] = [None] * len(offsets)
    rank = [-1] * len(offsets)

    def assign(t: int | None, role: str) -> None:
        if t is not None and _PRIORITY[role] > rank[t]:
            roles[t], rank[t] = role, _PRIORITY[role]

    out_tokens: list[list[int]] = [[] for _ in range(n_pairs)]
    arrows: list[int | None] = [None] * n_pairs
    for start, end, kind, pair in segments:
        if kind == "prompt":
            for c in range(start, end):
                assign(holder.get(c), "prompt")
        elif kind == "newline":
            for c in range(start, end):
                assign(holder.get(c), "newline")
        elif kind in ("input", "arrow", "output"):
            t = last.get(end - 1)
            # a tokenizer may drop trailing whitespace of a segment: fall back to the last held char
            c = end - 1
            while t is None and c > start:
                c -= 1
                t = last.get(c)
            assign(t, kind)
            if kind == "arrow":
                arrows[pair] = t
            if kind == "output":
                out_tokens[pair] = [u for u, (a, b) in enumerate(offsets) if a < end and b > start]
    return roles, out_tokens, arrows


def encode_prompts(
    tokenizer, prompts: Sequence[Prompt], n_first: int = 2, device: torch.device | str | None = None
) -> PromptBatch:
    """Tokenise prompts, find token roles and the positions whose logits predict answers."""
    if not getattr(tokenizer, "is_fast", False):
        raise IclError("token roles need a fast tokenizer (one with character offsets); load the model's tokenizer.json")
    enc = tokenizer([p.text for p in prompts], return_offsets_mapping=True, add_special_tokens=True)
    unk = getattr(tokenizer, "unk_token_id", None)
    rows = []
    for p, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"]):
        if unk is not None and unk in ids:
            words = sorted({p.text[s:e] for i, (s, e) in zip(ids, offsets) if i == unk})
            raise IclError(f"the model's vocabulary lacks {', '.join(map(repr, words))}; use tasks made of words it knows (toy-icl knows the built-in tasks' words)")
        n_pairs = len(p.pairs)
        roles, out_tokens, arrows = token_roles(offsets, p.segments, n_pairs)
        if arrows[-1] is None:
            raise IclError(f"could not locate the query separator in the tokenised prompt {p.text[-40:]!r}")
        ans = out_tokens[-1] if p.with_answer else []
        rows.append((ids, roles, arrows[-1], ans, out_tokens))
    B, P = len(rows), max(len(r[0]) for r in rows)
    n_pairs = max(len(r[4]) for r in rows)
    input_ids = torch.full((B, P), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention = torch.zeros((B, P), dtype=torch.long)
    roles_t = torch.zeros((B, P), dtype=torch.int8)
    query_arrow = torch.zeros(B, dtype=torch.long)
    answer_pos = torch.full((B, n_first), -1, dtype=torch.long)
    answer_ids = torch.zeros((B, n_first), dtype=torch.long)
    pair_pos = torch.full((B, n_pairs), -1, dtype=torch.long)
    pair_ids = torch.zeros((B, n_pairs), dtype=torch.long)
    for b, (ids, roles, arrow, ans, out_tokens) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        attention[b, :n] = 1
        roles_t[b, :n] = torch.tensor([ROLE_CODE[r] if r else 0 for r in roles], dtype=torch.int8)
        query_arrow[b] = arrow
        for j, t in enumerate(ans[:n_first]):
            answer_pos[b, j], answer_ids[b, j] = t - 1, ids[t]
        for k, toks in enumerate(out_tokens):
            if toks:
                pair_pos[b, k], pair_ids[b, k] = toks[0] - 1, ids[toks[0]]
    batch = PromptBatch(input_ids, attention, roles_t, query_arrow, answer_pos, answer_ids, pair_pos, pair_ids)
    return batch.to(device) if device is not None else batch
