"""The toy model's recipe: deterministic on CPU, a loadable HF checkpoint, vocabulary errors."""

import json

import pytest
from safetensors.torch import load_file

from icl_cli.zoo.toy_icl import ToyConfig, train


def test_training_is_deterministic_and_saves_an_hf_checkpoint(tmp_path):
    cfg = ToyConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64, steps=3, batch=4, max_shot=4)
    train(cfg, tmp_path / "a")
    meta = train(cfg, tmp_path / "b")
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    saved = json.loads((tmp_path / "a" / "toy_icl.json").read_text())
    assert saved["config"]["steps"] == 3 and meta["vocab_size"] == saved["vocab_size"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert model.config.model_type == "gemma" and tok.is_fast
    ids = tok("Follow the pattern:\nhot -> cold\nbig ->")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[:6] == ["<bos>", "Follow", "the", "pattern", ":", "\n"]


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    cfg = ToyConfig(d_model=32, n_layers=2, n_heads=2, d_mlp=64, steps=6, batch=4, max_shot=4)
    train(cfg, tmp_path / "full", checkpoint_every=2)

    def stop_at_5(step, total, loss):
        if step == 5:
            raise KeyboardInterrupt  # killed after the checkpoint of step 4

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=stop_at_5, checkpoint_every=2)
    assert (tmp_path / "cut" / ".toy-checkpoint.safetensors").exists()
    steps = []
    train(cfg, tmp_path / "cut", progress=lambda s, n, l: steps.append(s), resume=True, checkpoint_every=2)
    assert steps == [5, 6]
    wa = load_file(tmp_path / "full" / "model.safetensors")
    wb = load_file(tmp_path / "cut" / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert not (tmp_path / "cut" / ".toy-checkpoint.safetensors").exists()
