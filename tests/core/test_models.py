"""Model loading: local folders, dtypes, devices and every user-fixable failure as one line."""

from __future__ import annotations

import types

import pytest
import torch

from icl_cli.core import models
from icl_cli.core.models import PRESETS, hub_error_message, load_model, resolve_device, resolve_dtype
from icl_cli.core.errors import IclError
from tests.core.tiny_models import VOCAB, tiny_model


def _tokenizer():
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_loads_a_local_folder_frozen_in_eval_mode(folder):
    lm = load_model(str(folder), device="cpu")
    assert (lm.family, lm.n_layers, lm.d_model) == ("llama", 3, 48)
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token is not None
    ids = torch.tensor([lm.tokenizer("w5 w6 w7")["input_ids"]])
    assert lm.model(ids).logits.shape == (1, 3, VOCAB)


def test_dtype_and_device_map(folder):
    assert load_model(str(folder), dtype="bfloat16").dtype == torch.bfloat16
    lm = load_model(str(folder), device_map="auto")  # accelerate; CPU-only here
    assert lm.model(torch.tensor([[5, 6]])).logits.shape == (1, 2, VOCAB)


def test_bad_local_paths(tmp_path, folder):
    with pytest.raises(IclError, match="no such folder") as e:
        load_model(str(tmp_path / "nope"))
    _one_line(e)
    with pytest.raises(IclError, match="config.json"):
        load_model(str(tmp_path))  # a folder without config.json
    with pytest.raises(IclError, match="neither a GGUF file nor a model folder"):
        load_model(str(folder / "config.json"))


def test_unknown_names_point_to_the_presets():
    with pytest.raises(IclError, match="icl models ls") as e:
        load_model("no-such-model")
    _one_line(e)
    with pytest.raises(IclError, match="did you mean 'gemma-2-2b'"):
        load_model("gemma-2-2")


def test_missing_toy_model(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "TOY_DIR", tmp_path / "toy-icl")
    with pytest.raises(IclError, match="run `icl zoo train toy-icl`"):
        load_model("toy-icl")


def test_offline_hub_id_is_one_line_that_says_what_to_do(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    for name in ("gemma-1-2b", "google/gemma-2-9b"):
        with pytest.raises(IclError, match="pass that folder") as e:
            load_model(name, device="cpu")
        msg = _one_line(e)
        assert "`hf download google/gemma-" in msg and "huggingface-cli" not in msg


def _http_error(cls, status: int = 404):
    response = types.SimpleNamespace(headers={}, request=None, status_code=status)
    return cls("boom", response=response)


def test_hub_errors_become_instructions():
    from huggingface_hub import errors as hub

    gated = OSError("You are trying to access a gated repo.")
    gated.__cause__ = _http_error(hub.GatedRepoError, 403)
    msg = hub_error_message("llama-3.2-1b", "meta-llama/Llama-3.2-1B", gated)
    assert "gated" in msg and "HF_TOKEN" in msg and "`hf auth login`" in msg

    missing = OSError("x is not a local folder and is not a valid model identifier")
    missing.__cause__ = _http_error(hub.RepositoryNotFoundError)
    msg = hub_error_message("org/x", "org/x", missing)
    assert "not found" in msg and "icl models ls" in msg and "HF_TOKEN" in msg

    msg = hub_error_message("org/x", "org/x", _http_error(hub.HfHubHTTPError, 401))
    assert "401" in msg and "HF_TOKEN" in msg

    msg = hub_error_message("org/x", "org/x", ConnectionError("unreachable"))
    assert "no network" in msg and "pass that folder" in msg


def test_resolve_device_and_dtype():
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(IclError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(IclError, match="unknown device"):
        resolve_device("banana")
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        with pytest.raises(IclError, match="torch_xla"):
            resolve_device("xla")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(IclError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_presets_cover_the_spec():
    assert PRESETS["gemma-1-2b"][:4] == ("google/gemma-2b", 18, 2048, "gemma")
    assert PRESETS["gemma-1-2b-it"].hf_id == "google/gemma-2b-it"
    assert PRESETS["gemma-2-2b"][:3] == ("google/gemma-2-2b", 26, 2304)
    assert PRESETS["gemma-2-9b"][:3] == ("google/gemma-2-9b", 42, 3584)
    assert PRESETS["phi-3-mini"].hf_id == "microsoft/Phi-3-mini-4k-instruct"
    assert "toy-icl" in PRESETS


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch):
    import time

    import icl_cli.core.hub as hub
    from icl_cli.core.models import load_model, load_tokenizer

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-icl-test-cache")
    start = time.time()
    for fn in (load_model, load_tokenizer):
        with pytest.raises(IclError, match="no network") as err:
            fn("google/gemma-2b")
        assert "\n" not in str(err.value)
    assert time.time() - start < 20  # no minute of retries
