"""Scores from logits at the answer positions only equal those from the full logits."""

import pytest
import torch

from icl_cli.core.batch import encode_prompts
from icl_cli.core.metrics import correct, nll_per_prompt
from icl_cli.core.prompts import sample_prompts
from icl_cli.core.sites import HookedModel
from icl_cli.core.steering import BaseCache, run_answers, steered_answers, steered_logits
from icl_cli.core.tasks import load_task


def test_answer_only_scores_equal_full_logit_scores(tiny_lm):
    hm = HookedModel(tiny_lm.model)
    task = load_task("antonyms")
    # prompts of different lengths (padding) and 3 answer tokens read per prompt
    prompts = sample_prompts(task.pairs, 6, 0, 1) + sample_prompts(task.pairs, 5, 3, 2)
    b = encode_prompts(tiny_lm.tokenizer, prompts, n_first=3)
    full = hm.run(b.input_ids, b.attention_mask).logits
    logits, small = run_answers(hm, b)
    assert logits.shape[:2] == b.answer_pos.shape and logits.shape[1] < full.shape[1]
    torch.testing.assert_close(nll_per_prompt(logits, small), nll_per_prompt(full, b), atol=1e-5, rtol=1e-5)
    assert torch.equal(correct(logits, small), correct(full, b))
    for j in range(b.answer_pos.shape[1]):  # each row is the full logits at that answer position
        for r in range(len(b)):
            p = int(b.answer_pos[r, j])
            if p >= 0:
                torch.testing.assert_close(logits[r, j], full[r, p], atol=1e-5, rtol=1e-5)

    zero = sample_prompts(task.pairs, 6, 0, 3)
    cache = BaseCache.build(hm, tiny_lm.tokenizer, zero, [1])
    v = torch.randn(tiny_lm.d_model) * 3
    for mode in ("add", "replace"):
        lg, sm = steered_answers(hm, cache, 1, v, mode)
        ref = steered_logits(hm, cache, 1, v, mode)
        torch.testing.assert_close(nll_per_prompt(lg, sm), nll_per_prompt(ref, cache.batch), atol=1e-5, rtol=1e-5)
    assert float(nll_per_prompt(lg, sm).mean()) != pytest.approx(float(nll_per_prompt(*run_answers(hm, cache.batch)).mean()))
