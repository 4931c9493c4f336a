"""circuit.h5: write_h5 / read_h5 round-trip every field exactly, and refuse inconsistent graphs."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from icl_cli.circuit.graph import ERROR, CircuitGraph, read_h5, write_h5
from icl_cli.core.errors import IclError


def random_graph(n: int = 40, e: int = 90, seed: int = 0, per_position: bool = False) -> CircuitGraph:
    rng = np.random.default_rng(seed)
    roles = [f"pos:{i}" for i in range(12)] if per_position else ["prompt", "input", "arrow", "output", "newline"]
    feature = rng.integers(0, 2048, n)
    feature[rng.random(n) < 0.2] = ERROR
    return CircuitGraph(
        site=rng.choice(["resid", "attn", "transcoder"], n),
        layer=rng.integers(0, 6, n).astype(np.int64),
        role=rng.choice(roles, n),
        feature=feature.astype(np.int64),
        ie=rng.normal(size=n).astype(np.float32),
        act=rng.random(n).astype(np.float32),
        selected=rng.random(n) < 0.5,
        edge_src=rng.integers(0, n, e).astype(np.int64),
        edge_dst=rng.integers(0, n, e).astype(np.int64),
        edge_weight=rng.normal(size=e).astype(np.float32),
        sweep_threshold=np.geomspace(1e-4, 1.0, 7),
        sweep_n_nodes=np.arange(7, 0, -1).astype(np.int64) * 5,
        sweep_faithfulness=np.linspace(1.0, 0.1, 7),
        prompts=["hot → cold\nbig → small\nup →", "é → ü ✓\nyes →"],
        attrs={"model": "toy-icl", "tasks": ["antonyms", "en_es"], "method": "atp", "baseline": "zero",
               "metric": "all_pairs_logprob", "n_prompts": 2, "n_shot": 16, "layers": [0, 1, 2, 3, 4, 5],
               "threshold": 0.0123, "faithfulness": 0.96, "m_full": -0.5, "m_empty": -9.25,
               "per_position": per_position, "ig_steps": None},
    )


def assert_same(a: CircuitGraph, b: CircuitGraph) -> None:
    for name in ("site", "role"):
        assert getattr(b, name).tolist() == getattr(a, name).tolist()
    for name in ("layer", "feature", "selected", "edge_src", "edge_dst", "sweep_n_nodes"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name))
        assert getattr(b, name).dtype == getattr(a, name).dtype
    for name in ("ie", "act", "edge_weight", "sweep_threshold", "sweep_faithfulness"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name))  # bit-exact
    assert b.prompts == a.prompts
    assert b.attrs == a.attrs


@pytest.mark.parametrize("per_position", [False, True])
def test_round_trip_is_exact(tmp_path, per_position):
    g = random_graph(per_position=per_position)
    path = tmp_path / "circuit.h5"
    with h5py.File(path, "w") as f:
        f.attrs["icl_key"] = "abc"  # the store's own attributes do not leak into attrs
        f.attrs["icl_step"] = "circuit"
        write_h5(f, g)
    back = read_h5(path)
    assert_same(g, back)
    assert type(back.attrs["ig_steps"]) is type(None) and type(back.attrs["per_position"]) is bool
    assert type(back.attrs["n_shot"]) is int and type(back.attrs["threshold"]) is float
    assert (back.n_nodes, back.n_edges) == (40, 90)
    # the layout is the documented one, readable without our reader
    with h5py.File(path, "r") as f:
        assert f["nodes/site"].asstr()[3] == g.site[3]
        assert f["edges/src"].shape == (90,) and f["sweep/faithfulness"].shape == (7,)
        assert f.attrs["tasks"] == '["antonyms", "en_es"]' and f.attrs["method"] == "atp"


def test_round_trip_through_the_store(tmp_path):
    from icl_cli.store import StepSpec, Store

    g = random_graph(n=5, e=0, seed=3)
    store = Store(tmp_path / "store")

    def build(st):
        with st.h5("circuit.h5") as f:
            write_h5(f, g)
        return {}

    res = store.run(StepSpec(step="circuit-io-test", params={"x": 1}), build)
    assert_same(g, read_h5(res.artifact.file("circuit.h5")))


def test_empty_graph_round_trips(tmp_path):
    g = random_graph(n=0, e=0)
    g.prompts = []
    with h5py.File(tmp_path / "c.h5", "w") as f:
        write_h5(f, g)
    back = read_h5(tmp_path / "c.h5")
    assert back.n_nodes == 0 and back.n_edges == 0 and back.site.tolist() == []


def test_inconsistent_graph_is_refused(tmp_path):
    g = random_graph(n=10, e=4)
    g.edge_dst = np.array([0, 1, 2, 10])  # node 10 does not exist
    with h5py.File(tmp_path / "c.h5", "w") as f, pytest.raises(IclError, match="edge_dst"):
        write_h5(f, g)
    g = random_graph(n=10, e=4)
    g.ie = g.ie[:9]
    with h5py.File(tmp_path / "d.h5", "w") as f, pytest.raises(IclError, match="ie"):
        write_h5(f, g)


def test_not_a_circuit_file_is_one_line_error(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(IclError) as err:
        read_h5(tmp_path / "other.h5")
    assert "nodes/site" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(IclError, match="not an HDF5 file"):
        read_h5(tmp_path / "text.h5")
    with pytest.raises(IclError, match="does not exist"):
        read_h5(tmp_path / "missing.h5")
