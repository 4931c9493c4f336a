"""Prompts, seeded n-shot sampling and token roles (SPEC §2).

A prompt is built as a list of text segments, each tagged with what it is (instruction, input,
separator, output, pair separator). Token roles come from the tokenizer's character offsets:
``input`` / ``arrow`` / ``output`` = the token holding the last character of each x / separator
/ y, ``newline`` = the token holding the separator between pairs, ``prompt`` = every token of the
instruction. Token ids are never hard-coded, so multi-token words and any fast tokenizer work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from icl_cli.core.errors import IclError

ROLES = ("prompt", "input", "arrow", "output", "newline")
DUMMY_PAIR = ("X", "Y")
"""The dummy example prepended to 0-shot prompts for detector steering (SPEC §6)."""
ROLE_CODE = {name: i + 1 for i, name in enumerate(ROLES)}  # 0 = no role
# When one token holds the ends of two segments, the higher priority wins.
_PRIORITY = {"prompt": 0, "newline": 1, "input": 2, "output": 3, "arrow": 4}


@dataclass(frozen=True)
class Template:
    name: str
    prefix: str  # instruction (role `prompt`)
    before_x: str  # text before each x (no role)
    sep: str  # between x and y: its last token is the `arrow`
    after_y: str  # between pairs: its tokens are `newline`
    y_space: str  # text between the separator and y


TEMPLATES: dict[str, Template] = {
    "paper": Template("paper", "Follow the pattern:\n", "", " ->", "\n", " "),
    "hendel": Template("hendel", "", "example:", "->", "\n", ""),
    "todd": Template("todd", "", "Q: ", "\nA:", "\n\n", " "),
}


@dataclass
class Prompt:
    """One n-shot prompt: ``examples`` then the ``query`` (its answer appended when ``with_answer``)."""

    examples: list[tuple[str, str]]
    query: tuple[str, str]
    template: str = "paper"
    with_answer: bool = True
    text: str = ""
    # (start, end, kind, pair_index) for every segment of the text
    segments: list[tuple[int, int, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.text:
            self.text, self.segments = render(self.examples, self.query, self.template, self.with_answer)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [*self.examples, self.query]


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise IclError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def render(
    examples: Sequence[tuple[str, str]], query: tuple[str, str], template: str, with_answer: bool
) -> tuple[str, list[tuple[int, int, str, int]]]:
    """The prompt text and its tagged segments (character spans)."""
    t = get_template(template)
    parts: list[tuple[str, str, int]] = []
    if t.prefix:
        parts.append((t.prefix, "prompt", -1))
    pairs = [*examples, query]
    for i, (x, y) in enumerate(pairs):
        last = i == len(pairs) - 1
        if t.before_x:
            parts.append((t.before_x, "", i))
        parts.append((x, "input", i))
        parts.append((t.sep, "arrow", i))
        if last and not with_answer:
            break
        if t.y_space:
            parts.append((t.y_space, "", i))
        parts.append((y, "output", i))
        if not last:
            parts.append((t.after_y, "newline", i))
    text, segments, pos = "", [], 0
    for piece, kind, pair in parts:
        segments.append((pos, pos + len(piece), kind, pair))
        text += piece
        pos += len(piece)
    return text, segments


def sample_prompts(
    pairs: Sequence[tuple[str, str]],
    n_prompts: int,
    n_shot: int,
    seed: int,
    template: str = "paper",
    with_answer: bool = True,
    queries: Sequence[tuple[str, str]] | None = None,
    task_name: str = "task",
) -> list[Prompt]:
    """``n_prompts`` prompts of ``n_shot`` examples each, seeded.

    Queries are drawn from ``queries`` (default: all pairs) without replacement while possible;
    examples are drawn without replacement from the pairs, never including the query pair.
    """
    get_template(template)
    pairs = list(pairs)
    pool = list(queries) if queries is not None else pairs
    if n_shot < 0 or n_prompts < 1:
        raise IclError("n-shot must be ≥ 0 and the number of prompts ≥ 1")
    if n_shot > len(pairs) - 1:
        raise IclError(f"task {task_name} has {len(pairs)} pairs, so n-shot can be at most {len(pairs) - 1} (got {n_shot})")
    if not pool:
        raise IclError(f"task {task_name}: no query pairs to sample from")
    rng = random.Random(seed)
    order: list[tuple[str, str]] = []
    prompts = []
    for _ in range(n_prompts):
        if not order:
            order = rng.sample(pool, len(pool))
        query = order.pop()
        candidates = [p for p in pairs if p[0] != query[0]]
        examples = rng.sample(candidates, min(n_shot, len(candidates)))
        prompts.append(Prompt(examples, query, template, with_answer))
    return prompts


def split_pairs(pairs: Sequence[tuple[str, str]], n_test: int, seed: int) -> tuple[list, list]:
    """A seeded (train, held-out) split of a task's pairs."""
    pairs = list(pairs)
    rng = random.Random(seed)
    order = rng.sample(pairs, len(pairs))
    n_test = min(n_test, max(1, len(pairs) // 4))
    return order[n_test:], order[:n_test]
