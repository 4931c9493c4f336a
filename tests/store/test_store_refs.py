"""References: full key, unique prefix, names; clear errors listing candidates."""

from __future__ import annotations

import pytest

from icl_cli.core.errors import IclError
from icl_cli.store import StepSpec, compute_key


def test_resolve_by_key_prefix_and_name(store, make):
    art = make(store, layer=1, name="tv-a")
    assert store.resolve(art.key).key == art.key
    assert store.resolve(art.key[:6]).key == art.key
    assert store.resolve("tv-a").key == art.key
    assert store.resolve(art).key == art.key
    with pytest.raises(IclError, match="at least 6"):
        store.resolve(art.key[:5])


def test_step_mismatch_says_what_it_is(store, make):
    art = make(store, step="collect", layer=1)
    assert store.resolve(art.key, step="collect").step == "collect"
    assert store.resolve(art.key, step=("train-sae", "collect")).step == "collect"
    with pytest.raises(IclError, match="is a collect artifact, not train-sae"):
        store.resolve(art.key[:8], step="train-sae")


def test_ambiguous_prefix_lists_candidates(store, make):
    # find two parameter values whose keys share the first 6 hex digits (birthday: ~4k tries)
    seen: dict[str, int] = {}
    for i in range(200_000):
        prefix = compute_key("s", 1, {"i": i}, {})[:6]
        if prefix in seen:
            break
        seen[prefix] = i
    a, b = make(store, step="s", i=seen[prefix]), make(store, step="s", i=i)
    assert a.key[:6] == b.key[:6] == prefix
    with pytest.raises(IclError, match="ambiguous") as exc:
        store.resolve(prefix)
    assert a.key[:12] in str(exc.value) and b.key[:12] in str(exc.value)
    assert store.resolve(a.key[:20]).key == a.key


def test_unknown_ref_suggests_close_names_or_recent_artifacts(store, make):
    with pytest.raises(IclError, match="store is empty"):
        store.resolve("tv-antonyms")
    art = make(store, layer=1, name="tv-antonyms")
    with pytest.raises(IclError, match="did you mean: tv-antonyms"):
        store.resolve("tv-antonym")
    with pytest.raises(IclError, match=f"recent artifacts: {art.key[:12]}"):
        store.resolve("zzzzzz")
    with pytest.raises(IclError, match="no artifact"):
        store.resolve("f" * 64)


def test_tags_move_and_untag(store, make):
    a, b = make(store, layer=1), make(store, layer=2)
    store.tag(a.key[:8], "best")
    assert store.names() == {"best": a.key} and a.names == ["best"]
    store.tag(b, "best")  # a name may move to a new artifact
    assert store.resolve("best").key == b.key and a.names == []
    assert store.untag("best") == b.key and store.names() == {}
    for bad in ("", "has/slash", ".hidden", "abcdef12"):
        with pytest.raises(IclError, match="invalid name"):
            store.tag(a, bad)


def test_inputs_given_as_names_or_prefixes_bind_to_full_keys(store, make):
    model = make(store, step="import-model", name="toy")
    by_name = StepSpec("collect", {"layer": 1}, {"model": "toy"})
    by_key = StepSpec("collect", {"layer": 1}, {"model": model.key})
    by_art = StepSpec("collect", {"layer": 1}, {"model": model})
    art = make(store, step="collect", inputs={"model": "toy"}, layer=1)
    assert store.bind(by_name).key == by_key.key == by_art.key == art.key
    assert art.inputs == {"model": model.key}
    assert store.lookup(by_name).key == art.key
    with pytest.raises(IclError):
        store.lookup(StepSpec("collect", {"layer": 1}, {"model": "no-such-model"}))
