"""GGUF checkpoints (llama.cpp's single-file format), converted once into a model folder in the store.

    folder = gguf_folder("SmolLM2-135M-Instruct.Q4_1.gguf", store_root)   # an HF folder (config.json, ...)
    lm = load_model("model.Q8_0.gguf")                                     # what models.py does with it

1. Check before anything is written: the ``gguf`` package is importable, the file starts with the
   GGUF magic and its header and tensor table parse within the file, its architecture is one that
   transformers reads from GGUF *and* the compute core hooks (arch.py), and every tensor's type is
   one that ``gguf`` can dequantize. Each failure is one ``IclError`` line.
2. Key the conversion by the file's content: the sha256 of its bytes (a ``gguf`` store step whose
   params are that hash), so a renamed or moved copy reuses it. Hashing 100 MB takes about a
   second; the hash is remembered by (path, size, mtime) in ``<store>/.cache/gguf-sha256.json``,
   so a reload only stats the file.
3. Convert: transformers reads the file (``from_pretrained(..., gguf_file=)``, which dequantizes
   every tensor and undoes llama.cpp's q/k row permutation of Llama-family attention), and the
   float32 weights, the config and the tokenizer are written as an ordinary folder. Every later
   load reads that folder (safetensors, no dequantization).

Gemma-1 files (the paper's model) are read through transformers' GGUF loader with the Gemma-1
entries it lacks (the same metadata and norm convention as Gemma-2: llama.cpp stores RMSNorm
weights as 1 + w), see ``_gemma1_support``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from icl_cli.core.errors import IclError

MAGIC = b"GGUF"
STEP = "gguf"
VERSION = 1
HASH_CACHE = Path(".cache") / "gguf-sha256.json"
INSTALL = "pip install gguf"
_log = logging.getLogger("icl")

_store_root: Path | None = None


def use_store(root: str | os.PathLike | None) -> None:
    """Where conversions are cached from now on (the CLI sets its --store here)."""
    global _store_root
    _store_root = None if root is None else Path(root)


def store_root() -> Path:
    """The store conversions go to: the one set by use_store, else $ICL_STORE, else ./artifacts."""
    return _store_root or Path(os.environ.get("ICL_STORE", "artifacts"))


class Header(NamedTuple):
    architecture: str
    """``general.architecture`` as the file spells it (llama, qwen2, gemma2, ...)."""
    name: str
    """``general.name`` (may be empty)."""
    n_tensors: int
    types: tuple[str, ...]
    """The distinct tensor types (F32, Q4_1, ...)."""


# ---- finding and checking a file ------------------------------------------------------------------
def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def find_file(path: Path) -> Path:
    """The GGUF file of ``path``: the file itself, or the one ``.gguf`` file in a folder."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(f.name for f in found[:4])})"
        raise IclError(f"{path} holds {what}; pass the .gguf file itself")
    return found[0]


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise IclError(f"reading GGUF files needs the gguf package; `{INSTALL}`") from None
    return gguf


def supported_families() -> tuple[str, ...]:
    """GGUF architectures transformers reads (plus Gemma-1, added here) that arch.py can hook."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from icl_cli.core.arch import ARCHS

    return tuple(sorted((set(GGUF_SUPPORTED_ARCHITECTURES) | {"gemma"}) & set(ARCHS)))


def read_header(path: Path) -> Header:
    """Parse and check ``path``'s header and tensor table (1 of the module docstring)."""
    gguf = _require_gguf()
    if not is_gguf(path):
        raise IclError(f"{path} is not a GGUF file (it does not start with the GGUF magic); pass a .gguf "
                       "checkpoint or a model folder")
    size = path.stat().st_size
    try:
        fields, tensors, data_start = _parse(path)
    except (EOFError, ValueError, UnicodeDecodeError, OverflowError, OSError) as exc:
        raise IclError(f"{path} is truncated or corrupt ({size} bytes; {_first_line(exc)}); download it again") from None
    qtypes = {}
    end = data_start
    for name, shape, code, offset in tensors:
        try:
            qtype = gguf.GGMLQuantizationType(code)
        except ValueError:
            raise IclError(f"{path.name}: tensor {name} has the unknown type {code}; `pip install -U gguf` "
                           "may know it") from None
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        n = 1
        for d in shape:
            n *= d
        end = max(end, data_start + offset + n // block * nbytes)
        qtypes[qtype] = True
    if end > size or not tensors:
        raise IclError(f"{path} is truncated ({size} bytes, its tensors end at byte {end}); download it again")
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise IclError(f"{path} has no general.architecture field; it is not a model checkpoint")
    families = supported_families()
    if arch not in families:
        raise IclError(f"{path.name}: GGUF architecture {arch!r} is not supported; icl reads GGUF files of "
                       f"{', '.join(families)}")
    types = sorted(qtypes, key=int)
    bad = [t.name for t in types if not _dequantizable(gguf, t)]
    if bad:
        raise IclError(f"{path.name} holds tensors of type {', '.join(bad)}, which the gguf package cannot "
                       "dequantize; use a file quantized as F32, F16, BF16, Q8_0, Q4_K, ... (`pip install -U gguf` "
                       "may add the type)")
    name = fields.get("general.name")
    return Header(arch, name if isinstance(name, str) else "", len(tensors), tuple(t.name for t in types))


# GGUF value types (the spec's gguf_type): struct format of each scalar; 8 string, 9 array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _parse(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]], int]:
    """(scalar and string metadata, [(tensor name, shape, type code, offset)], byte where the tensor
    data starts) of a GGUF v2/v3 file. Arrays are skipped, not read (a vocabulary is 100k strings):
    a second in Python where gguf.GGUFReader takes many."""
    import struct

    with open(path, "rb", buffering=1 << 20) as fh:
        def take(n: int) -> bytes:
            b = fh.read(n)
            if len(b) != n:
                raise EOFError(f"the file ends at byte {fh.tell()}, inside its header")
            return b

        def num(fmt: str):
            return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

        def string() -> str:
            return take(num("Q")).decode("utf-8")

        def value(kind: int):
            if kind in _SCALARS:
                return num(_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                inner, count = num("I"), num("Q")
                if inner in _SCALARS:
                    fh.seek(count * struct.calcsize(_SCALARS[inner]), 1)
                else:
                    for _ in range(count):
                        value(inner)
                return None
            raise ValueError(f"unknown metadata value type {kind}")

        take(4)  # the magic, checked by is_gguf
        version = num("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (icl reads versions 2 and 3)")
        n_tensors, n_kv = num("Q"), num("Q")
        fields = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(num("I"))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            shape = tuple(num("Q") for _ in range(num("I")))
            tensors.append((name, shape, num("I"), num("Q")))
        align = fields.get("general.alignment") or 32
        data_start = -(-fh.tell() // align) * align
    return fields, tensors, data_start


def _dequantizable(gguf, qtype) -> bool:
    """Whether ``gguf.dequantize`` handles ``qtype`` (probed on one zero block)."""
    import numpy as np

    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.dequantize(np.zeros((1, nbytes), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


# ---- the content key -----------------------------------------------------------------------------
def file_sha256(path: Path, root: Path) -> str:
    """sha256 of ``path``'s bytes, remembered in the store's hash cache by (path, size, mtime)."""
    from icl_cli.store.fsutil import hash_file

    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = _read_cache(root)
    if ident in cache:
        return cache[ident]
    return hash_file(path)[0]


def _read_cache(root: Path) -> dict[str, str]:
    try:
        data = json.loads((root / HASH_CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(path: Path, sha: str, root: Path) -> None:
    from icl_cli.store.fsutil import atomic_write_text

    st = path.stat()
    cache = _read_cache(root)
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if cache.get(ident) == sha:
        return
    cache[ident] = sha
    (root / HASH_CACHE).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / HASH_CACHE, json.dumps(cache, indent=0, sort_keys=True) + "\n")


def spec_of(sha: str):
    from icl_cli.store import StepSpec

    return StepSpec(step=STEP, params={"sha256": sha, "dtype": "float32"}, version=VERSION)


# ---- converting ------------------------------------------------------------------------------------
def cached_folder(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path | None:
    """The converted folder of a GGUF file (or a folder holding one) if the store has it, else None."""
    from icl_cli.store import Store

    file = find_file(Path(path).expanduser())
    store = Store(root if root is not None else store_root())
    if not is_gguf(file):
        return None
    art = store.lookup(spec_of(file_sha256(file, store.root)))
    return art.path if art is not None else None


def gguf_folder(path: str | os.PathLike, root: str | os.PathLike | None = None,
                log: Callable[[str], None] | None = None) -> Path:
    """An HF model folder with the dequantized weights of the GGUF file ``path`` (or of the one
    .gguf file in the folder ``path``), converted on first use and cached in the store ``root``."""
    from icl_cli.store import Store

    file = find_file(Path(path).expanduser())
    store = Store(root if root is not None else store_root())
    if not is_gguf(file):
        read_header(file)  # raises the one-line error (missing package, or not GGUF)
    sha = file_sha256(file, store.root)
    spec = spec_of(sha)
    art = store.lookup(spec)
    if art is None:
        header = read_header(file)  # all checks before the store is touched
        say = log or _log.info
        say(f"converting {file.name} ({header.architecture}, {'/'.join(header.types)}) to float32 once; "
            f"cached as {spec.key[:12]} in {store.root}")
        try:
            art = store.run(spec, lambda st: _convert(file, header, sha, Path(st.dir)), log=lambda m: None).artifact
        except IclError:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers' reader on a file it cannot map
            raise IclError(f"could not convert {file.name} ({header.architecture}): {type(exc).__name__}: "
                           f"{_first_line(exc)}") from exc
    _remember(file, sha, store.root)
    return art.path


def _convert(file: Path, header: Header, sha: str, out: Path) -> dict:
    """Dequantize ``file`` with transformers and write config, weights and tokenizer into ``out``."""
    import copy
    import time

    import torch
    import transformers as tr
    from safetensors.torch import save_model

    t0 = time.perf_counter()
    folder, name = str(file.parent), file.name
    with _gemma1_support(header.architecture), _quiet():
        tokenizer = tr.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = tr.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written below are plain float32
    config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))  # tied weights once
    _plain_tokenizer(tr, tokenizer).save_pretrained(out)
    (out / "gguf.json").write_text(json.dumps({
        "file": name, "sha256": sha, "architecture": header.architecture, "name": header.name,
        "tensor_types": list(header.types), "n_tensors": header.n_tensors,
        "transformers": tr.__version__}, indent=1) + "\n")
    return {"architecture": header.architecture, "model_type": config.model_type,
            "n_params": sum(p.numel() for p in model.parameters()), "seconds": round(time.perf_counter() - t0, 2)}


def _plain_tokenizer(tr, tokenizer):
    """The tokenizer as a generic fast tokenizer, which a reload rebuilds from tokenizer.json as it is
    (a model-specific class such as GemmaTokenizer would rebuild its pipeline from the vocabulary)."""
    specials = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    plain = tr.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                       **{k: v for k, v in specials.items() if v is not None})
    plain.chat_template = getattr(tokenizer, "chat_template", None)
    return plain


def tokenizer_from_file(path: str | os.PathLike):
    """The tokenizer of a GGUF file, read from its metadata alone (seconds; no weights dequantized)."""
    file = find_file(Path(path).expanduser())
    header = read_header(file)
    import transformers as tr

    with _gemma1_support(header.architecture), _quiet():
        return tr.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No per-tensor progress bar from transformers (the command layer reports what happens); its
    GGUF reader calls tqdm directly, so that name is swapped for a disabled tqdm meanwhile."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as mg
    from transformers.utils import logging as hf_logging

    was, bar = hf_logging.is_progress_bar_enabled(), getattr(mg, "tqdm", None)
    hf_logging.disable_progress_bar()
    if bar is not None:
        mg.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
        if bar is not None:
            mg.tqdm = bar


@contextlib.contextmanager
def _gemma1_support(architecture: str) -> Iterator[None]:
    """Within the block, transformers' GGUF loader reads Gemma-1 files.

    Its tables lack the entries for ``gemma``, which llama.cpp writes like ``gemma2``: the same
    metadata keys (head_dim in attention.key_length) and RMSNorm weights stored as 1 + w
    (Gemma2TensorProcessor subtracts the 1). The entries are removed again on exit.
    """
    if architecture != "gemma":
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as mg
    from transformers.integrations import ggml

    keys = {k: v for k, v in ggml.GGUF_CONFIG_MAPPING["gemma2"].items() if k != "attention.sliding_window"}
    added = []
    if "gemma" not in ggml.GGUF_CONFIG_MAPPING:
        ggml.GGUF_CONFIG_MAPPING["gemma"] = keys
        added.append(lambda: ggml.GGUF_CONFIG_MAPPING.pop("gemma", None))
    if "gemma" not in mg.GGUF_SUPPORTED_ARCHITECTURES:
        mg.GGUF_SUPPORTED_ARCHITECTURES.append("gemma")
        added.append(lambda: mg.GGUF_SUPPORTED_ARCHITECTURES.remove("gemma"))
    if "gemma" not in mg.TENSOR_PROCESSORS:
        mg.TENSOR_PROCESSORS["gemma"] = mg.Gemma2TensorProcessor
        added.append(lambda: mg.TENSOR_PROCESSORS.pop("gemma", None))
    try:
        yield
    finally:
        for undo in reversed(added):
            undo()
