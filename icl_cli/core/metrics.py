"""Metrics on a PromptBatch (SPEC §3). All return plain scalars as 0-d tensors (differentiable)."""

from __future__ import annotations

import torch

from icl_cli.core.batch import PromptBatch


def _gather_logprobs(logits: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[b, j] | logits at pos[b, j]) -> [B, J]; entries with pos < 0 are 0."""
    B = logits.shape[0]
    safe = pos.clamp(min=0)
    rows = logits[torch.arange(B, device=logits.device)[:, None], safe]  # [B, J, V]
    logp = torch.log_softmax(rows.float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    return torch.where(pos >= 0, logp, torch.zeros_like(logp))


def answer_logprobs(logits: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """[B, n_first] log-probabilities of the query's first answer tokens (0 where absent)."""
    return _gather_logprobs(logits, batch.answer_pos, batch.answer_ids)


def nll_per_prompt(logits: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """[B] summed NLL of the first n_first answer tokens of each query."""
    return -answer_logprobs(logits, batch).sum(-1)


def nll(logits: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """Mean over prompts of the summed NLL of the first n_first answer tokens."""
    return nll_per_prompt(logits, batch).mean()


def correct(logits: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """[B] bool: the greedy first answer token is right."""
    if (batch.answer_pos[:, 0] < 0).any():
        raise ValueError("accuracy needs prompts built with their answers (with_answer=True)")
    pos = batch.answer_pos[:, 0]
    pred = logits[torch.arange(len(batch), device=logits.device), pos].argmax(-1)
    return pred == batch.answer_ids[:, 0]


def acc(logits: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    return correct(logits, batch).float().mean()


def all_pairs_logprob(logits: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """Mean over prompts of the mean log-prob of each pair's first answer token, first pair excluded."""
    logp = _gather_logprobs(logits, batch.pair_answer_pos, batch.pair_answer_ids)[:, 1:]
    mask = (batch.pair_answer_pos[:, 1:] >= 0).float()
    per_prompt = (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_prompt.mean()
