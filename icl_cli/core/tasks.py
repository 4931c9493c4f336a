"""Tasks: lists of (input, output) string pairs (SPEC §2).

The built-in suite mirrors the paper's 23 tasks. Word tasks are JSON files in
``icl_cli/data/tasks`` (list-of-``{"input","output"}`` format); the three algorithmic tasks are
generated with a fixed seed from the English words of the suite. External files may use either
public format: ``{input: output}`` (Hendel et al.) or ``[{"input": .., "output": ..}]`` (Todd et al.).
"""

from __future__ import annotations

import difflib
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from icl_cli.core.errors import IclError

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"

GROUPS: dict[str, tuple[str, ...]] = {
    "knowledge": (
        "country_capital", "location_continent", "location_country", "location_language",
        "location_religion", "person_language", "person_profession", "football_player_position",
    ),
    "linguistic": (
        "antonyms", "singular_plural", "plural_singular", "present_simple_gerund",
        "present_simple_past_simple", "present_simple_past_perfect",
    ),
    "translation": ("en_es", "en_fr", "en_it", "es_en", "fr_en", "it_en"),
    "algorithmic": ("algo_first", "algo_second", "algo_last"),
}
BUILTIN_NAMES: tuple[str, ...] = tuple(name for names in GROUPS.values() for name in names)
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}

ALGO_SEED = 1234
"""Seed of the generated algorithmic tasks (fixed, so the built-in suite never changes)."""
ALGO_SIZE = 200
ALGO_PICK = {"algo_first": 0, "algo_second": 1, "algo_last": 3}
# English single-word inputs that feed the algorithmic tasks (shared with the word tasks).
ALGO_SOURCES = ("antonyms", "singular_plural", "present_simple_gerund", "en_es", "en_fr", "en_it")


@dataclass(frozen=True)
class Task:
    name: str
    group: str
    pairs: tuple[tuple[str, str], ...]
    source: str
    """File the pairs came from, or ``generated (seed N)``."""

    def __len__(self) -> int:
        return len(self.pairs)


def parse_pairs(raw: object, where: str) -> list[tuple[str, str]]:
    """Pairs from either public format; raises IclError naming the offending key or item."""
    if isinstance(raw, dict):
        items = list(raw.items())
        label = lambda i, k: f"key {k!r}"  # noqa: E731
    elif isinstance(raw, list):
        items = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or "input" not in item or "output" not in item:
                raise IclError(f"{where}: item {i} is not an object with 'input' and 'output'")
            items.append((item["input"], item["output"]))
        label = lambda i, k: f"item {i} (input {k!r})"  # noqa: E731
    else:
        raise IclError(f"{where}: expected a JSON object {{input: output}} or a list of {{\"input\", \"output\"}}")
    if not items:
        raise IclError(f"{where}: the task has no pairs")
    pairs = []
    for i, (x, y) in enumerate(items):
        if isinstance(y, list) and y and all(isinstance(v, str) for v in y):
            y = y[0]  # some public files list several accepted outputs; the first is canonical
        if not isinstance(x, str) or not isinstance(y, str):
            raise IclError(f"{where}: {label(i, x)} must map a string to a string")
        x, y = x.strip(), y.strip()
        if not x or not y:
            raise IclError(f"{where}: {label(i, x)} has an empty {'input' if not x else 'output'}")
        pairs.append((x, y))
    return pairs


def load_task_file(path: str | Path, name: str | None = None, group: str | None = None) -> Task:
    path = Path(path)
    if not path.is_file():
        raise IclError(f"task file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise IclError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); save the task file as UTF-8") from None
    except OSError as exc:
        raise IclError(f"cannot read task file {path}: {exc.strerror}") from None
    if not text.strip():
        raise IclError(f"{path}: the file is empty")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IclError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    name = name or path.stem
    return Task(name, group or GROUP_OF.get(name, "external"), tuple(parse_pairs(raw, str(path))), str(path))


@lru_cache(maxsize=1)
def _builtin_word_tasks() -> dict[str, Task]:
    tasks = {}
    for name in BUILTIN_NAMES:
        path = DATA_DIR / f"{name}.json"
        if path.exists():
            tasks[name] = load_task_file(path)
    return tasks


def _algo_tasks(words: list[str]) -> dict[str, Task]:
    rng = random.Random(ALGO_SEED)
    inputs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    while len(inputs) < ALGO_SIZE and len(words) >= 4:
        draw = tuple(rng.sample(words, 4))
        if draw not in seen:
            seen.add(draw)
            inputs.append(list(draw))
    source = f"generated (seed {ALGO_SEED})"
    return {
        name: Task(name, "algorithmic", tuple((", ".join(ws), ws[idx]) for ws in inputs), source)
        for name, idx in ALGO_PICK.items()
    }


@lru_cache(maxsize=1)
def builtin_tasks() -> dict[str, Task]:
    """The built-in suite, in the paper's order (tasks whose file is absent are skipped)."""
    word = _builtin_word_tasks()
    pool = sorted(
        {x for name in ALGO_SOURCES if name in word for x, _ in word[name].pairs if x.isalpha() and x.islower()}
    )
    tasks = dict(word)
    tasks.update(_algo_tasks(pool))
    return {name: tasks[name] for name in BUILTIN_NAMES if name in tasks}


def suite_from_dir(tasks_dir: str | Path) -> dict[str, Task]:
    """Every ``*.json`` task file in a folder (e.g. the task-vectors repository's data folder)."""
    root = Path(tasks_dir)
    if not root.is_dir():
        raise IclError(f"--tasks-dir {root} is not a folder")
    files = sorted(p for p in root.rglob("*.json") if p.is_file())
    if not files:
        raise IclError(f"--tasks-dir {root} holds no .json task files")
    tasks = {}
    for path in files:
        name = path.stem
        if name in tasks:
            name = f"{path.parent.name}/{path.stem}"
        group = path.parent.name if path.parent != root else GROUP_OF.get(name, "external")
        tasks[name] = load_task_file(path, name=name, group=group)
    return tasks


def load_task(ref: str, tasks_dir: str | Path | None = None) -> Task:
    """A task by name (built-in, or in ``tasks_dir``) or by path to a JSON file."""
    suite = suite_from_dir(tasks_dir) if tasks_dir else builtin_tasks()
    if ref in suite:
        return suite[ref]
    if ref.endswith(".json") or Path(ref).is_file():
        return load_task_file(ref)
    close = difflib.get_close_matches(ref, list(suite), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `icl tasks ls` lists them"
    raise IclError(f"unknown task {ref!r}{hint}")


def resolve_tasks(spec: str, tasks_dir: str | Path | None = None) -> list[Task]:
    """``all`` or a comma-separated list of names / paths."""
    if spec.strip() == "all":
        suite = suite_from_dir(tasks_dir) if tasks_dir else builtin_tasks()
        return list(suite.values())
    refs = [r.strip() for r in spec.split(",") if r.strip()]
    if not refs:
        raise IclError("no task given; pass --tasks all or a comma-separated list")
    return [load_task(r, tasks_dir) for r in refs]
