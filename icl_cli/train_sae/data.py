"""Where training activations come from: text -> token chunks -> model activations -> shuffle buffer.

    texts   = text_stream("tasks" | "HuggingFaceFW/fineweb" | "a.txt,b.jsonl" | folder, part, seed)
    chunks  = token_chunks(texts, tokenizer, ctx)        # lists of ≤ ctx ids, each starting with BOS
    source  = ActivationSource(hm, chunks, sites, ...)   # [N, n_dict, d] per read, early exit
    buffer  = ShuffleBuffer(source, capacity, generator) # shuffled batches, resumable

The stream is deterministic for a seed, so a resumed run re-creates it and skips the chunks it
had consumed (`source.position`). Held-out evaluation text: for the toy corpus another seed; for
files and datasets the first `n_eval` chunks, which training never sees.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from icl_cli.core.errors import IclError

EVAL_SEED_OFFSET = 7919


# ---- text -------------------------------------------------------------------------------------
def toy_prompts(seed: int, max_shot: int = 24) -> Iterator[str]:
    """Endless few-shot prompts of the built-in tasks in the paper template (the toy's own data)."""
    from icl_cli.core.prompts import Prompt
    from icl_cli.core.tasks import builtin_tasks

    tasks = list(builtin_tasks().values())
    if not tasks:
        raise IclError("no built-in tasks found to build the toy corpus from")
    rng = random.Random(seed)
    while True:
        task = rng.choice(tasks)
        n = min(rng.randint(0, max_shot), len(task.pairs) - 1)
        chosen = rng.sample(task.pairs, n + 1)
        yield Prompt(chosen[:-1], chosen[-1], "paper", True).text


def _local_files(spec: str) -> list[Path] | None:
    paths = [Path(p).expanduser() for p in spec.split(",") if p.strip()]
    if not paths or not all(p.exists() for p in paths):
        return None
    files: list[Path] = []
    for p in paths:
        files += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl")) if p.is_dir() else [p]
    bad = [f for f in files if f.suffix not in (".txt", ".jsonl")]
    if bad:
        raise IclError(f"{bad[0]}: local datasets are .txt or .jsonl files")
    return files


def _file_texts(files: Sequence[Path]) -> Iterator[str]:
    for f in files:
        if f.suffix == ".txt":
            # paragraphs (blank-line separated) are documents
            for doc in f.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                if doc.strip():
                    yield doc
            continue
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise IclError(f"{f}:{n} is not valid JSON") from None
                text = obj.get("text") if isinstance(obj, dict) else obj if isinstance(obj, str) else None
                if isinstance(text, str) and text.strip():
                    yield text


def _hf_texts(name: str) -> Iterator[str]:
    from icl_cli.core.hub import hub_reachable

    if not hub_reachable():
        raise IclError(f"cannot stream dataset {name!r}: the Hugging Face Hub is unreachable (no network); "
                       "connect, or pass local .txt/.jsonl files with --dataset")
    try:
        import datasets
    except ImportError:
        raise IclError(f"streaming {name!r} needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
        for row in ds:
            text = row.get("text") if isinstance(row, dict) else None
            if isinstance(text, str) and text.strip():
                yield text
    except IclError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, auth: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise IclError(f"could not stream dataset {name!r} ({type(exc).__name__}: {first}); check the name and "
                       "the network, or pass local .txt/.jsonl files with --dataset") from None


def text_stream(dataset: str, seed: int, part: str = "train") -> Iterator[str]:
    """Documents of `dataset` ("tasks", local files, or an HF dataset name)."""
    if dataset == "tasks":
        return toy_prompts(seed + (EVAL_SEED_OFFSET if part == "eval" else 0))
    files = _local_files(dataset)
    if files is not None:
        return _file_texts(files)
    if Path(dataset).suffix in (".txt", ".jsonl") or dataset.startswith((".", "/", "~")):
        raise IclError(f"dataset {dataset} does not exist")
    return _hf_texts(dataset)


def token_chunks(texts: Iterator[str], tokenizer, ctx: int) -> Iterator[list[int]]:
    """Each document split into pieces of ≤ ctx − 1 tokens, each prefixed with BOS (if any)."""
    bos = tokenizer.bos_token_id
    body = ctx - 1 if bos is not None else ctx
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), body):
            piece = ids[i : i + body]
            if len(piece) >= 2 or (bos is not None and piece):
                yield ([bos] if bos is not None else []) + piece


def toy_eval_chunks(tokenizer, ctx: int, seed: int, n: int) -> tuple[list[list[int]], list[list[bool]]]:
    """Held-out task prompts (≤ ctx tokens) and, per token, whether it is an answer token.

    The toy model is trained to predict answers only, so its CE loss is measured on them; the
    answer tokens come from character offsets, like every token role.
    """
    from icl_cli.core.batch import token_roles
    from icl_cli.core.prompts import Prompt
    from icl_cli.core.tasks import builtin_tasks

    tasks = list(builtin_tasks().values())
    rng = random.Random(seed + EVAL_SEED_OFFSET)
    chunks, targets = [], []
    while len(chunks) < n:
        task = rng.choice(tasks)
        k = min(rng.randint(0, 24), len(task.pairs) - 1)
        chosen = rng.sample(task.pairs, k + 1)
        p = Prompt(chosen[:-1], chosen[-1], "paper", True)
        enc = tokenizer(p.text, return_offsets_mapping=True)
        _, out_tokens, _ = token_roles(enc["offset_mapping"], p.segments, len(p.pairs))
        answer = {t for toks in out_tokens for t in toks}
        ids = enc["input_ids"][:ctx]
        chunks.append(ids)
        targets.append([t in answer for t in range(len(ids))])
    return chunks, targets


def chunk_stream(dataset: str, tokenizer, ctx: int, seed: int, n_eval: int
                 ) -> tuple[Iterator[list[int]], list[list[int]], list[list[bool]] | None]:
    """(training chunks, held-out chunks, held-out CE targets or None for every next token).

    Files/datasets hold out their first n_eval chunks; the toy corpus holds out prompts of
    another seed, scored on their answer tokens.
    """
    if dataset == "tasks":
        train = token_chunks(text_stream(dataset, seed, "train"), tokenizer, ctx)
        held, targets = toy_eval_chunks(tokenizer, ctx, seed, n_eval)
        return train, held, targets
    stream = token_chunks(text_stream(dataset, seed, "train"), tokenizer, ctx)
    held = list(itertools.islice(stream, n_eval))
    return stream, held, None


def pad_batch(chunks: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, P] and attention mask [B, P]."""
    P = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), P), dtype=torch.long)
    for b, c in enumerate(chunks):
        ids[b, : len(c)] = torch.tensor(c)
        mask[b, : len(c)] = 1
    return ids, mask


def token_mask(mask: Tensor, has_bos: bool) -> Tensor:
    """[B, P] bool: the positions whose activations we train and evaluate on (not pad, not BOS)."""
    m = mask.bool().clone()
    if has_bos:
        m[:, 0] = False
    return m


# ---- activations --------------------------------------------------------------------------------
class ActivationSource:
    """Runs the model over chunks and returns activations at the reads of every dictionary.

    reads: for each dictionary, (input site, output site or None). Returns x [N, n_dict, d_in]
    and, if any dictionary is a transcoder, t [N, n_dict, d_out] (else None: the target is x).
    """

    def __init__(self, hm, tokenizer, chunks: Iterator[list[int]], reads: list[tuple], rows: int, device, dtype):
        self.hm, self.chunks, self.reads, self.rows = hm, chunks, reads, rows
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.has_bos = tokenizer.bos_token_id is not None
        self.device, self.dtype = device, dtype
        self.position = 0  # chunks consumed
        self.stop_after = max(s.layer for pair in reads for s in pair if s is not None)

    def skip(self, n: int) -> None:
        for _ in itertools.islice(self.chunks, n):
            pass
        self.position += n

    @torch.no_grad()
    def next_tokens(self, n_tokens: int) -> tuple[Tensor, Tensor | None]:
        xs, ts, got = [], [], 0
        while got < n_tokens:
            batch = list(itertools.islice(self.chunks, self.rows))
            if not batch:
                break
            self.position += len(batch)
            x, t = self.forward_chunks(batch)
            xs.append(x)
            if t is not None:
                ts.append(t)
            got += xs[-1].shape[0]
        if not xs:
            return torch.empty(0), None
        return torch.cat(xs), (torch.cat(ts) if ts else None)

    @torch.no_grad()
    def forward_chunks(self, batch: list[list[int]]) -> tuple[Tensor, Tensor | None]:
        """One forward pass over ``batch`` (token id lists): x [N, n_dict, d_in] at the kept
        tokens (row-major), t [N, n_dict, d_out] or None (distributed.py splits this over ranks)."""
        ids, mask = pad_batch(batch, self.pad_id)
        sites = {s for pair in self.reads for s in pair if s is not None}
        out = self.hm.run(ids.to(self.device), mask.to(self.device), read=sites, stop_after=self.stop_after)
        keep = token_mask(mask, self.has_bos).to(self.device)
        x = torch.stack([out.acts[i][keep] for i, _ in self.reads], 1).to(self.dtype)
        t = None
        if any(o is not None for _, o in self.reads):
            t = torch.stack([out.acts[o if o is not None else i][keep] for i, o in self.reads], 1).to(self.dtype)
        return x, t


class ShuffleBuffer:
    """In-memory shuffle buffer: refilled to capacity when half empty, then permuted."""

    def __init__(self, source: ActivationSource, capacity: int, generator: torch.Generator):
        self.source, self.capacity, self.gen = source, capacity, generator
        self.x: Tensor | None = None
        self.t: Tensor | None = None
        self.exhausted = False

    def _refill(self) -> None:
        have = 0 if self.x is None else self.x.shape[0]
        x, t = self.source.next_tokens(self.capacity - have)
        if x.numel() == 0:
            self.exhausted = True
            return
        self.x = x if self.x is None else torch.cat([self.x, x])
        if t is not None:
            self.t = t if self.t is None else torch.cat([self.t, t])
        perm = torch.randperm(self.x.shape[0], generator=self.gen).to(self.x.device)
        self.x = self.x[perm]
        if self.t is not None:
            self.t = self.t[perm]

    def next_batch(self, n: int) -> tuple[Tensor, Tensor | None]:
        """x [n, n_dict, d_in], t [n, n_dict, d_out] or None. Fewer than n only at the end."""
        if not self.exhausted and (self.x is None or self.x.shape[0] < max(self.capacity // 2, n)):
            self._refill()
        if self.x is None:
            return torch.empty(0), None
        x, self.x = self.x[:n], self.x[n:]
        t = None
        if self.t is not None:
            t, self.t = self.t[:n], self.t[n:]
        return x, t

    def state(self) -> dict[str, Tensor]:
        st = {"x": self.x.contiguous()} if self.x is not None else {}
        if self.t is not None:
            st["t"] = self.t.contiguous()
        return st

    def load(self, st: dict[str, Tensor]) -> None:
        self.x = st.get("x")
        self.t = st.get("t")
