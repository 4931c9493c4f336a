"""Prompts, sampling and token roles, with a word-level and a subword (BPE) tokenizer."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from icl_cli.core.batch import encode_prompts
from icl_cli.core.prompts import ROLES, Prompt, render, sample_prompts
from icl_cli.core.errors import IclError

PAIRS = [("hot", "cold"), ("bigger", "smaller"), ("happy", "sad"), ("Buenos Aires", "Argentina"),
         ("wonderful", "terrible"), ("up", "down"), ("light", "dark"), ("early", "late")]


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE trained here, so that most words split into several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Follow the pattern:\n" + "\n".join(f"{x} -> {y}" for x, y in PAIRS)] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="Ġ")


def test_render_paper_template():
    text, _ = render([("a", "b"), ("c", "d")], ("e", "f"), "paper", with_answer=False)
    assert text == "Follow the pattern:\na -> b\nc -> d\ne ->"
    text, _ = render([("a", "b")], ("e", "f"), "hendel", with_answer=True)
    assert text == "example:a->b\nexample:e->f"
    text, _ = render([("a", "b")], ("e", "f"), "todd", with_answer=True)
    assert text == "Q: a\nA: b\n\nQ: e\nA: f"


@pytest.mark.parametrize("template", ["paper", "hendel", "todd"])
def test_roles_from_offsets_with_subword_tokens(bpe, template):
    prompt = Prompt(PAIRS[:5], PAIRS[5], template, with_answer=True)
    batch = encode_prompts(bpe, [prompt])
    ids = batch.input_ids[0].tolist()
    offsets = bpe(prompt.text, return_offsets_mapping=True)["offset_mapping"]
    roles = [ROLES[c - 1] if c else None for c in batch.roles[0].tolist()]
    # some words really are split into several tokens
    n_tokens_of = lambda s, e: sum(1 for a, b in offsets if a < e and b > s)  # noqa: E731
    segs = {(kind, pair): (s, e) for s, e, kind, pair in prompt.segments if kind}
    assert any(n_tokens_of(*segs[("input", i)]) > 1 for i in range(6))
    for i in range(6):
        for kind in ("input", "arrow", "output"):
            s, e = segs[(kind, i)]
            holders = [t for t, (a, b) in enumerate(offsets) if a <= e - 1 < b]
            assert len(holders) == 1 and roles[holders[0]] == kind, (kind, i, template)
    # only one token per word gets the role: the count of each role equals the number of pairs
    assert roles.count("input") == 6 and roles.count("arrow") == 6 and roles.count("output") == 6
    if template == "paper":
        assert roles[: roles.index("input")].count("prompt") >= 3
    # the answer is the query's output tokens, predicted from the previous position
    s, e = segs[("output", 5)]
    first = min(t for t, (a, b) in enumerate(offsets) if a < e and b > s)
    assert batch.answer_pos[0, 0].item() == first - 1 and batch.answer_ids[0, 0].item() == ids[first]
    assert len(ids) == len(roles)


def test_sampling_is_seeded_and_never_shows_the_query():
    a = sample_prompts(PAIRS, 20, 5, seed=3)
    b = sample_prompts(PAIRS, 20, 5, seed=3)
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.text for p in a] != [p.text for p in sample_prompts(PAIRS, 20, 5, seed=4)]
    for p in a:
        assert p.query not in p.examples and len(set(p.examples)) == 5
    with pytest.raises(IclError, match="at most 7"):
        sample_prompts(PAIRS, 1, 8, seed=0, task_name="x")


def test_unknown_words_are_named(tmp_path):
    vocab = {w: i for i, w in enumerate(["<unk>", "Follow", "the", "pattern:", "a", "->", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")
    with pytest.raises(IclError, match="lacks 'zebra';"):
        encode_prompts(fast, [Prompt([("a", "b")], ("zebra", "b"), "paper")])
