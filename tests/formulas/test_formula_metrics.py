"""SPEC §3 metrics and §2/§4 splits against brute-force loops on hand-built batches."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from icl_cli.core.batch import PromptBatch, encode_prompts
from icl_cli.core.metrics import acc, all_pairs_logprob, nll
from icl_cli.core.prompts import Prompt, sample_prompts, split_pairs

B, P, V = 4, 9, 13


def hand_batch(seed: int = 0) -> tuple[torch.Tensor, PromptBatch]:
    """Random logits and a batch whose answer slots include absent (-1) entries."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, P, V, generator=g) * 3
    answer_pos = torch.tensor([[3, 4], [5, -1], [2, 3], [6, 7]])
    answer_ids = torch.tensor([[1, 7], [4, 0], [12, 2], [0, 5]])
    # per pair: the position predicting its first answer token; -1 pads shorter prompts
    pair_pos = torch.tensor([[0, 1, 3, -1], [1, 3, 5, -1], [0, 0, -1, -1], [1, 2, 4, 6]])  # 0 is a position
    pair_ids = torch.tensor([[2, 3, 1, 0], [9, 8, 4, 0], [5, 12, 0, 0], [1, 1, 2, 0]])
    z = torch.zeros(B, P, dtype=torch.long)
    batch = PromptBatch(z, torch.ones_like(z), z.to(torch.int8), torch.zeros(B, dtype=torch.long), answer_pos,
                        answer_ids, pair_pos, pair_ids)
    return logits, batch


def logp(logits, b, pos, tok) -> float:
    row = logits[b, pos].double()
    return float(row[tok] - torch.logsumexp(row, -1))


def test_nll_is_the_mean_over_prompts_of_the_summed_answer_token_nll():
    logits, batch = hand_batch()
    want = 0.0
    for b in range(B):
        s = 0.0
        for j in range(2):
            if batch.answer_pos[b, j] >= 0:
                s -= logp(logits, b, int(batch.answer_pos[b, j]), int(batch.answer_ids[b, j]))
        want += s / B
    assert float(nll(logits, batch)) == pytest.approx(want, rel=1e-5)


def test_acc_is_the_fraction_whose_greedy_first_answer_token_is_right():
    logits, batch = hand_batch()
    batch.answer_pos[0] = torch.tensor([0, 1])  # position 0 can predict an answer (no BOS)
    # rows 0, 1, 3 right and row 2 wrong on the first answer token; the second never counts
    for b, right in enumerate([True, True, False, True]):
        pos, tok = int(batch.answer_pos[b, 0]), int(batch.answer_ids[b, 0])
        logits[b, pos] = 0.0
        logits[b, pos, tok if right else (tok + 1) % V] = 5.0
        if batch.answer_pos[b, 1] >= 0:
            logits[b, int(batch.answer_pos[b, 1])] = 0.0
            logits[b, int(batch.answer_pos[b, 1]), (tok + 2) % V] = 9.0
    assert float(acc(logits, batch)) == pytest.approx(0.75)
    batch.answer_pos[1, 0] = -1
    with pytest.raises(ValueError, match="with_answer"):
        acc(logits, batch)


def test_all_pairs_logprob_skips_the_first_pair_and_averages_pairs_then_prompts():
    logits, batch = hand_batch(1)
    per_prompt = []
    for b in range(B):
        vals = [logp(logits, b, int(batch.pair_answer_pos[b, k]), int(batch.pair_answer_ids[b, k]))
                for k in range(1, batch.pair_answer_pos.shape[1]) if batch.pair_answer_pos[b, k] >= 0]
        per_prompt.append(sum(vals) / len(vals))
    assert float(all_pairs_logprob(logits, batch)) == pytest.approx(sum(per_prompt) / B, rel=1e-5)


def test_metrics_are_differentiable_in_the_logits():
    logits, batch = hand_batch()
    logits.requires_grad_(True)
    (nll(logits, batch) - all_pairs_logprob(logits, batch)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def bpe():
    pairs = [("wonderful", "terrible"), ("Buenos Aires", "Argentina"), ("happy", "sad"), ("up", "down")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Follow the pattern:\n" + "\n".join(f"{x} -> {y}" for x, y in pairs[:2])] * 2
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="Ġ"), pairs


def test_answer_positions_are_the_first_n_first_tokens_of_the_query_answer(bpe):
    tok, pairs = bpe
    prompts = [Prompt(pairs[:2], pairs[2], "paper", True), Prompt(pairs[2:], pairs[1], "paper", True)]
    batch = encode_prompts(tok, prompts, n_first=2)
    for b, p in enumerate(prompts):
        full = tok(p.text)["input_ids"]
        prefix = tok(p.text[: p.text.rfind("->") + 2])["input_ids"]  # up to the query's separator
        start = len(prefix)
        while tok.decode([full[start]]).strip() == "":  # the space before y is not part of y
            start += 1
        answer = full[start:]
        assert len(answer) >= 2 and tok.decode(answer).strip() == p.query[1]  # multi-token under this BPE
        for j in range(2):
            assert int(batch.answer_pos[b, j]) == start - 1 + j
            assert int(batch.answer_ids[b, j]) == answer[j]


def test_split_is_a_partition_with_a_quarter_at_most_held_out():
    pairs = [(f"x{i}", f"y{i}") for i in range(23)]
    for n_test, seed in ((32, 0), (3, 1), (100, 5)):
        train, held = split_pairs(pairs, n_test, seed)
        assert not set(train) & set(held)
        assert sorted(train + held) == sorted(pairs)
        assert len(held) == min(n_test, max(1, len(pairs) // 4))
    assert split_pairs(pairs, 5, 0) == split_pairs(pairs, 5, 0)
    assert split_pairs(pairs, 5, 0) != split_pairs(pairs, 5, 1)


def test_prompts_never_show_the_query_and_draw_queries_from_the_given_pool():
    pairs = [(f"x{i}", f"y{i}") for i in range(12)]
    pool = pairs[:3]
    ps = sample_prompts(pairs, 9, 5, seed=3, queries=pool)
    for p in ps:
        assert p.query in pool and p.query not in p.examples
        assert len(set(p.examples)) == 5 and set(p.examples) <= set(pairs)
    assert sorted(p.query for p in ps[:3]) == sorted(pool)  # without replacement while possible
