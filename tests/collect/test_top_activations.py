"""Max-activating examples: the streamed top-k equals a brute-force scan of the same chunks."""

import itertools
import json

import torch

from icl_cli.core.sites import HookedModel, Site
from icl_cli.dictionaries.base import DictConfig, build
from icl_cli.collect.top_activations import TopParams, contexts, top_activations
from icl_cli.train_sae.data import text_stream, token_chunks


def test_streamed_top_k_equals_brute_force(tiny_lm):
    torch.manual_seed(0)
    sae = build(DictConfig(d_in=32, d_sae=40, arch="standard", site="resid_pre", layer=2))
    p = TopParams((1, 7, 33), n_tokens=300, ctx=24, n_top=4)
    r = top_activations(tiny_lm, sae, p, batch_size=3)
    hm = HookedModel(tiny_lm.model)
    chunks = token_chunks(text_stream("tasks", p.seed), tiny_lm.tokenizer, p.ctx)
    values, seen = [], 0
    while seen < p.n_tokens:  # one chunk at a time, in batches of 3 as the scan consumed them
        for chunk in itertools.islice(chunks, 3):
            ids = torch.tensor([chunk])
            acts = sae.encode(hm.run(ids, read=[Site("resid_pre", 2)]).acts[Site("resid_pre", 2)])[0, 1:]
            values.append(acts[:, list(p.features)])
            seen += len(chunk) - 1
    allv = torch.cat(values)  # [tokens, F]
    expect = allv.topk(4, dim=0).values.T
    torch.testing.assert_close(r.values, expect, rtol=1e-5, atol=1e-6)
    ctx = contexts(tiny_lm.tokenizer, list(p.features), r)
    top = ctx[1][0]
    assert 0 <= top["fire"] < len(top["tokens"]) and top["value"] == float(r.values[0, 0])


def test_cli_top_activations_and_bad_feature(tiny_toy_dir, tmp_path):
    from typer.testing import CliRunner

    from icl_cli.cli.app import app
    from icl_cli.dictionaries.io import save_saelens

    sae = build(DictConfig(d_in=32, d_sae=40, arch="standard", site="resid_pre", layer=1, model=str(tiny_toy_dir)))
    save_saelens(sae, tmp_path / "sae")
    runner = CliRunner()
    base = ["--store", str(tmp_path / "s")]
    res = runner.invoke(app, base + ["--json", "collect", "top-activations", "--sae", str(tmp_path / "sae"), "--features", "3,4",
                                     "--tokens", "200", "--n-top", "2"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data["features"]) == {"3", "4"} and len(data["features"]["3"]) == 2
    bad = runner.invoke(app, base + ["collect", "top-activations", "--sae", str(tmp_path / "sae"), "--features", "99"])
    assert bad.exit_code == 1 and "out of range" in bad.stderr


def test_contexts_are_text_not_byte_level_pieces():
    """A byte-level BPE tokenizer's pieces ('Ġ' for a space, 'Ċ' for a newline, 'Ã©' for é) are shown
    as the text they stand for."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    from icl_cli.collect.top_activations import TopResult, contexts

    vocab = {"Ġ": 0, "Ċ": 1, "Ã": 2, "©": 3, "Ã©": 4, "t": 5, "Ġt": 6, "Ġété": 7, "é": 8}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    ids = torch.tensor([[6, 1, 4, 5]])  # "Ġt", "Ċ", "Ã©", "t"
    r = TopResult(torch.tensor([[1.0]]), torch.tensor([[2]]), ids[None])
    row = contexts(tok, [0], r)[0][0]
    assert row["tokens"] == [" t", "\n", "é", "t"] and row["fire"] == 2
