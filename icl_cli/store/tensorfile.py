"""safetensors files with reproducible bytes and, optionally, a checksum of their tensor data.

    save(path, tensors, metadata)                 # same tensors + metadata -> same bytes
    save(path, tensors, metadata, checksum=True)  # also records sha256 of the data section
    damage(path)                                  # None, or what is wrong with the file

The safetensors writer keeps ``__metadata__`` in a hash map, so its key order (and the file's
sha256) changes from run to run. After writing, the header is rewritten in place in one canonical
spelling (metadata keys sorted, tensors in data order); it has the same length, since only the
order changes. With ``checksum`` a placeholder metadata entry reserves the room for the sha256 of
the data section, filled in by the same rewrite.

Layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length n, n
bytes of JSON (padded with spaces), then the tensor data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

CHECKSUM = "data_sha256"
_PLACEHOLDER = "0" * 64
_CHUNK = 1 << 20


def _read_header(f) -> tuple[int, dict[str, Any]]:
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > 100_000_000:
        raise ValueError(f"header length {n} is implausible")
    text = f.read(n)
    if len(text) != n:
        raise ValueError("truncated inside its header")
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return n, header


def _canonical(header: dict[str, Any]) -> bytes:
    meta = header.get("__metadata__")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    out: dict[str, Any] = {}
    if meta is not None:
        out["__metadata__"] = dict(sorted(meta.items()))
    for name in sorted(tensors, key=lambda k: (tensors[k]["data_offsets"][0], k)):
        t = tensors[name]
        out[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": t["data_offsets"]}
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _data_sha256(f, start: int) -> str:
    f.seek(start)
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def save(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None, checksum: bool = False) -> Path:
    """Write torch tensors (or numpy arrays) to ``path`` with a canonical header; string metadata."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if checksum:
        meta[CHECKSUM] = _PLACEHOLDER
    first = next(iter(tensors.values()), None)
    if first is not None and type(first).__module__.startswith("numpy"):
        from safetensors.numpy import save_file

        save_file(dict(tensors), str(path), metadata=meta or None)
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)
    with open(path, "r+b") as f:
        n, header = _read_header(f)
        if checksum:
            header["__metadata__"][CHECKSUM] = _data_sha256(f, 8 + n)
        text = _canonical(header)
        if len(text) > n:  # cannot happen (same content, other order); keep the library's bytes
            raise RuntimeError(f"canonical safetensors header of {path} is longer than the written one")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))
    return Path(path)


def damage(path: Path) -> str | None:
    """What is wrong with a safetensors file (truncated, unreadable header, checksum mismatch),
    or None when it is intact as far as can be told (files without a checksum: size and header)."""
    try:
        with open(path, "rb") as f:
            n, header = _read_header(f)
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            size = os.fstat(f.fileno()).st_size - 8 - n
            if size != max(ends, default=0):
                return f"its data holds {size} bytes, its header describes {max(ends, default=0)} (truncated or padded)"
            want = (header.get("__metadata__") or {}).get(CHECKSUM)
            if want is not None and _data_sha256(f, 8 + n) != want:
                return "its tensor data does not match its sha256"
    except FileNotFoundError:
        return "it is missing"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"it is unreadable ({' '.join(str(exc).split())})"
    return None
