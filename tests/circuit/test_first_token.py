"""A prompt's first token is never a circuit node: without a start-of-sequence token (SmolLM2) the
first word is the attention sink, far outside what the dictionaries were trained on."""

from icl_cli.circuit.splice import Groups
from icl_cli.core.batch import encode_prompts
from icl_cli.core.prompts import ROLE_CODE, Prompt
from tests.core.char_tokenizer import CharTokenizer


def test_first_token_is_in_no_group_but_the_next_prompt_token_is():
    batch = encode_prompts(CharTokenizer(), [Prompt([("hot", "cold")], ("big", "small")), Prompt([], ("up", "down"))])
    assert int(batch.roles[0, 0]) == ROLE_CODE["prompt"]  # the first token holds a role...
    for kw in ({}, {"prompt_positions": True}, {"per_position": True}):
        g = Groups.of(batch, **kw)
        assert (g.index[:, 0] == -1).all(), kw  # ...but is no node
        assert int(g.index[0, 1]) >= 0 and int(g.index[1, 1]) >= 0, kw  # the second token still is
