"""The toy corpus is scored on answer tokens: the held-out targets are exactly the y tokens."""

from icl_cli.train_sae.data import toy_eval_chunks


def test_targets_are_the_answer_tokens(tiny_lm):
    tok = tiny_lm.tokenizer
    chunks, targets = toy_eval_chunks(tok, ctx=512, seed=0, n=20)
    arrow, newline = tok.convert_tokens_to_ids("->"), tok.convert_tokens_to_ids("\n")
    for ids, tgt in zip(chunks, targets):
        assert len(ids) == len(tgt) and any(tgt)
        # in the paper template an answer is what lies between an arrow and the next newline
        inside, expect = False, []
        for t in ids:
            expect.append(inside and t != newline)
            if t == arrow:
                inside = True
            elif t == newline:
                inside = False
        assert tgt == expect
