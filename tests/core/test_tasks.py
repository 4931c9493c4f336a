"""Task loaders: both public formats, folders as suites, clear errors."""

import json

import pytest

from icl_cli.core.tasks import BUILTIN_NAMES, builtin_tasks, load_task, load_task_file, resolve_tasks, suite_from_dir
from icl_cli.core.errors import IclError


def test_both_public_formats(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"hot": "cold", "up": "down"}))
    (tmp_path / "l.json").write_text(json.dumps([{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}]))
    assert load_task_file(tmp_path / "d.json").pairs == load_task_file(tmp_path / "l.json").pairs == (("hot", "cold"), ("up", "down"))
    suite = suite_from_dir(tmp_path)
    assert set(suite) == {"d", "l"}
    assert [t.name for t in resolve_tasks("all", tmp_path)] == ["d", "l"]


@pytest.mark.parametrize(
    "content, message",
    [("", "empty"), ('{"a": "b",\n "c": }', "line 2"), ('{"a": ""}', "'a' has an empty output"),
     ('[{"input": "a"}]', "item 0"), ("[]", "no pairs"), ('"text"', "expected a JSON object")],
)
def test_bad_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(IclError, match=message) as info:
        load_task_file(path)
    assert "bad.json" in str(info.value)


def test_unknown_task_suggests_names():
    with pytest.raises(IclError, match="did you mean antonyms"):
        load_task("antonym")


def test_builtin_suite_complete():
    suite = builtin_tasks()
    assert list(suite) == list(BUILTIN_NAMES)
    for name, task in suite.items():
        assert len(task) >= 100, name
        assert len({x for x, _ in task.pairs}) == len(task), f"{name} has duplicate inputs"
    first = suite["algo_first"].pairs[0]
    words = first[0].split(", ")
    assert len(set(words)) == 4 and first[1] == words[0]
    assert suite["algo_last"].pairs[0][1] == words[3] and suite["algo_second"].pairs[0][1] == words[1]
