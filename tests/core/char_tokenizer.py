"""A tokenizer for tests: every character one token (offsets (i, i+1)) and no start-of-sequence
token, so every word spans several tokens and a prompt's first word is its first token (as in
SmolLM2). It has what ``core.batch.encode_prompts`` reads: ``is_fast``, offsets, special ids."""


class CharTokenizer:
    is_fast = True
    bos_token_id = None
    pad_token_id = 0
    unk_token_id = None

    def __call__(self, texts, return_offsets_mapping=False, add_special_tokens=True):
        return {"input_ids": [[ord(c) for c in t] for t in texts],
                "offset_mapping": [[(i, i + 1) for i in range(len(t))] for t in texts]}
