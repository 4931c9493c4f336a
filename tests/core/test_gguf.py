"""GGUF checkpoints: tiny files written here the way llama.cpp writes them load as the model they
were written from (weights and logits), are converted once, and every bad file is one line with
nothing written to the store."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from icl_cli.core import gguf as G  # noqa: E402
from icl_cli.core.errors import IclError  # noqa: E402
from icl_cli.core.models import load_model, load_tokenizer  # noqa: E402
from tests.core.gguf_files import gguf_tensors, reference_model, write_gguf  # noqa: E402


@pytest.fixture(autouse=True)
def _store(tmp_path, monkeypatch):
    """Every conversion of a test goes to its own store."""
    monkeypatch.setattr(G, "_store_root", tmp_path / "store")


def _store_files(tmp_path) -> list:
    root = tmp_path / "store"
    return sorted(p for p in root.rglob("*")) if root.exists() else []


# Gemma-2's query scale and soft-caps are not in a GGUF (transformers uses Gemma-2's defaults),
# so its logits are compared only where those match: weights are compared for every family.
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gemma2", "phi3", "mistral"])
def test_a_gguf_loads_the_weights_it_was_written_from(tmp_path, family):
    ref = reference_model(family)
    file = write_gguf(ref, tmp_path / f"{family}.gguf", name="Mistral-tiny" if family == "mistral" else "tiny")
    lm = load_model(str(file), device="cpu")
    # llama.cpp writes Mistral as architecture llama; it loads as a Llama, which computes the same
    assert lm.family == ("llama" if family == "mistral" else family) and lm.n_layers == 2 and lm.d_model == 48
    got, want = lm.model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    if family in ("llama", "mistral"):
        # the file's q/k rows really are permuted: loading them as stored would be wrong
        stored = gguf_tensors(ref, family)["blk.0.attn_q.weight"]
        assert not np.allclose(stored, want["model.layers.0.self_attn.q_proj.weight"].numpy())
    if family != "gemma2":
        ids = torch.tensor([[3, 70, 101, 258, 32, 119, 255, 9]])
        with torch.no_grad():
            torch.testing.assert_close(lm.model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    # the tokenizer comes from the file's vocabulary: byte-level, with the merges written there
    assert lm.tokenizer("hello world", add_special_tokens=False).input_ids == [258, 111, 259, 111, 114, 108, 100]
    assert lm.tokenizer.bos_token == "<s>" and lm.tokenizer.eos_token == "</s>"


def test_quantized_tensors_are_dequantized(tmp_path):
    import gguf

    ref = reference_model("llama")
    file = write_gguf(ref, tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    got = load_model(str(file), device="cpu").model.state_dict()
    w = ref.state_dict()["model.layers.1.mlp.down_proj.weight"]
    q = got["model.layers.1.mlp.down_proj.weight"]
    # Q8_0: 32-value blocks, one float16 scale d = max|x| / 127 each: an error is at most half a
    # step plus 127 times the scale's rounding (≤ d·2⁻¹¹)
    step = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
    err = (q - w).reshape(-1, 32).abs()
    assert (err <= step * (0.5 + 127 * 2**-11) + 1e-6).all() and err.max() > 0


def test_the_second_load_converts_nothing_and_hashes_nothing(tmp_path, monkeypatch):
    from icl_cli.store import fsutil

    file = write_gguf(reference_model("qwen2"), tmp_path / "m.gguf")
    first = G.gguf_folder(file)
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()

    def boom(*a, **k):
        raise AssertionError("converted or hashed again")

    monkeypatch.setattr(G, "_convert", boom)
    monkeypatch.setattr(fsutil, "hash_file", boom)
    assert G.gguf_folder(file) == first
    assert G.gguf_folder(tmp_path) == first  # the folder holding the one .gguf file
    lm = load_model(str(file), device="cpu")
    assert lm.hf_id == str(first)


def test_a_copy_elsewhere_reuses_the_conversion(tmp_path):
    file = write_gguf(reference_model("llama"), tmp_path / "a.gguf")
    first = G.gguf_folder(file)
    copy = tmp_path / "other" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(file.read_bytes())
    assert G.gguf_folder(copy) == first  # content key: the sha256 of the bytes


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_not_a_gguf_and_truncated_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(IclError) as exc:
        load_model(str(junk), device="cpu")
    assert "not a GGUF file" in _one_line(exc)

    good = write_gguf(reference_model("llama"), tmp_path / "good.gguf").read_bytes()
    for cut in (len(good) // 2, 40):
        cut_file = tmp_path / f"cut{cut}.gguf"
        cut_file.write_bytes(good[:cut])
        with pytest.raises(IclError) as exc:
            load_model(str(cut_file), device="cpu")
        assert "truncated" in _one_line(exc)
    assert _store_files(tmp_path) == []


def test_an_unsupported_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(IclError) as exc:
        load_model(str(tmp_path / "bert.gguf"), device="cpu")
    msg = _one_line(exc)
    assert "'bert' is not supported" in msg and "llama" in msg and "gemma" in msg
    assert _store_files(tmp_path) == []


def test_a_quantization_type_that_cannot_be_dequantized(tmp_path, monkeypatch):
    import gguf

    ref = reference_model("llama")
    tensors = gguf_tensors(ref, "llama")
    path = tmp_path / "q81.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    for name, arr in tensors.items():
        if name == "blk.0.ffn_down.weight":  # Q8_1 blocks, which gguf has no dequantizer for
            rows, cols = arr.shape
            block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            w.add_tensor(name, np.zeros((rows, cols // block * nbytes), np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(IclError) as exc:
        load_model(str(path), device="cpu")
    assert "type Q8_1, which the gguf package cannot dequantize" in _one_line(exc)
    assert _store_files(tmp_path) == []


def test_the_gguf_package_missing(tmp_path, monkeypatch):
    file = write_gguf(reference_model("llama"), tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(IclError) as exc:
        load_model(str(file), device="cpu")
    assert "`pip install gguf`" in _one_line(exc)
    with pytest.raises(IclError, match="pip install gguf"):
        load_tokenizer(str(file))
    assert _store_files(tmp_path) == []


def test_a_folder_with_two_gguf_files_names_them(tmp_path):
    write_gguf(reference_model("llama"), tmp_path / "a.gguf")
    write_gguf(reference_model("llama", seed=1), tmp_path / "b.gguf")
    with pytest.raises(IclError) as exc:
        load_model(str(tmp_path), device="cpu")
    assert "2 .gguf files (a.gguf, b.gguf)" in _one_line(exc)


def test_cli_errors_are_one_line_exit_1_and_write_nothing(tmp_path):
    from typer.testing import CliRunner

    from icl_cli.cli.app import app

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 12)  # the magic, then a header cut short
    store = tmp_path / "cli-store"
    res = CliRunner().invoke(app, ["--store", str(store), "tasks", "show", "antonyms", "--model", str(junk)])
    assert res.exit_code == 1, res.output
    assert "truncated" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not store.exists()


def test_the_tokenizer_alone_needs_no_conversion(tmp_path, monkeypatch):
    file = write_gguf(reference_model("llama"), tmp_path / "m.gguf")
    monkeypatch.setattr(G, "_convert", lambda *a, **k: (_ for _ in ()).throw(AssertionError("converted")))
    tok = load_tokenizer(str(file))
    assert tok("hello", add_special_tokens=False).input_ids == [258, 111]
    assert _store_files(tmp_path) == []
