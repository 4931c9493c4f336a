"""The circuit graph: what ``icl circuit`` computes and stores, independent of how.

Nodes are (site, layer, role, feature) with feature = -1 for the error node of a (site, layer,
role). ``site`` is the dictionary kind: ``resid`` (SAE on resid_pre[l]), ``attn`` (SAE on
attn_out[l]) or ``transcoder`` (mlp_in[l] -> mlp_out[l]). ``role`` is one of
core.prompts.ROLES, or ``pos:<i>`` for per-position graphs.

Edges join nodes of consecutive sites (SPEC §7) and are stored as a sparse list of node indices.

On disk (``circuit.h5``):
    attrs   model, tasks (JSON list), method, baseline, metric, n_prompts, n_shot, layers (JSON),
            threshold, faithfulness, m_full, m_empty, per_position, ig_steps
    nodes/  site [N] str, layer [N] int, role [N] str, feature [N] int, ie [N] float32,
            act [N] float32 (mean activation of the node's feature over its role's positions),
            selected [N] bool
    edges/  src [E] int, dst [E] int, weight [E] float32    (indices into nodes)
    sweep/  threshold [K] float, n_nodes [K] int, faithfulness [K] float
    prompts/text [n_prompts] str
Attributes whose value is a list, dict or None are stored as JSON text; their names are listed in
the attribute ``json_attrs`` (JSON list) so that ``read_h5`` restores them.

    with st.h5("circuit.h5") as f: write_h5(f, g)
    g = read_h5(art.file("circuit.h5"))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icl_cli.core.errors import IclError

NODE_SITES = ("resid", "attn", "transcoder")
"""Dictionary kinds, in the order they act within one layer."""

ERROR = -1
"""``feature`` of an error node."""


@dataclass
class CircuitGraph:
    """Nodes, edges and the threshold sweep of one circuit (arrays are numpy, one row per node)."""

    site: np.ndarray  # [N] str
    layer: np.ndarray  # [N] int64
    role: np.ndarray  # [N] str
    feature: np.ndarray  # [N] int64, ERROR for error nodes
    ie: np.ndarray  # [N] float32 indirect effect on the metric (positive: supports it)
    act: np.ndarray  # [N] float32 mean activation at the role's positions
    selected: np.ndarray  # [N] bool, in the circuit at the chosen threshold
    edge_src: np.ndarray  # [E] int64 index into nodes
    edge_dst: np.ndarray  # [E] int64
    edge_weight: np.ndarray  # [E] float32
    sweep_threshold: np.ndarray  # [K]
    sweep_n_nodes: np.ndarray  # [K]
    sweep_faithfulness: np.ndarray  # [K]
    prompts: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    """model, tasks, method, baseline, metric, n_prompts, n_shot, layers, threshold,
    faithfulness, m_full, m_empty, per_position, ig_steps."""

    @property
    def n_nodes(self) -> int:
        return int(len(self.site))

    @property
    def n_edges(self) -> int:
        return int(len(self.edge_src))


# ---- HDF5 IO ------------------------------------------------------------------------------------
_NODE_FIELDS = {"site": "site", "layer": "layer", "role": "role", "feature": "feature", "ie": "ie", "act": "act",
                "selected": "selected"}
_EDGE_FIELDS = {"src": "edge_src", "dst": "edge_dst", "weight": "edge_weight"}
_SWEEP_FIELDS = {"threshold": "sweep_threshold", "n_nodes": "sweep_n_nodes", "faithfulness": "sweep_faithfulness"}
_DTYPES = {"site": str, "role": str, "layer": np.int64, "feature": np.int64, "ie": np.float32, "act": np.float32,
           "selected": np.bool_, "edge_src": np.int64, "edge_dst": np.int64, "edge_weight": np.float32,
           "sweep_threshold": np.float64, "sweep_n_nodes": np.int64, "sweep_faithfulness": np.float64}
_STORE_ATTRS = ("icl_key", "icl_step", "json_attrs")  # written by the store or by write_h5 itself


def check_graph(g: CircuitGraph) -> None:
    """Raise IclError unless the arrays of `g` have consistent lengths and edges index real nodes."""
    n, e, k = len(g.site), len(g.edge_src), len(g.sweep_threshold)
    for group, n_rows in ((_NODE_FIELDS, n), (_EDGE_FIELDS, e), (_SWEEP_FIELDS, k)):
        for attr in group.values():
            if np.ndim(getattr(g, attr)) != 1 or len(getattr(g, attr)) != n_rows:
                raise IclError(f"circuit graph field {attr} has shape {np.shape(getattr(g, attr))}, expected ({n_rows},)")
    for attr in ("edge_src", "edge_dst"):
        idx = np.asarray(getattr(g, attr))
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IclError(f"circuit graph {attr} indexes node {int(idx.max() if idx.max() >= n else idx.min())} "
                           f"but there are {n} nodes")


def _column(values: Any, attr: str) -> np.ndarray:
    if _DTYPES[attr] is str:
        return np.array([str(v) for v in values], dtype=str)
    return np.asarray(values, dtype=_DTYPES[attr])


def write_h5(f, g: CircuitGraph) -> None:
    """Write `g` into an open h5py File (or group) `f` in the layout of this module's docstring."""
    import h5py

    check_graph(g)
    text = h5py.string_dtype("utf-8")
    for group, fields in (("nodes", _NODE_FIELDS), ("edges", _EDGE_FIELDS), ("sweep", _SWEEP_FIELDS)):
        grp = f.require_group(group)
        for name, attr in fields.items():
            col = _column(getattr(g, attr), attr)
            if _DTYPES[attr] is str:
                grp.create_dataset(name, data=np.array(col.tolist(), dtype=object), dtype=text)
            else:
                grp.create_dataset(name, data=col)
    f.require_group("prompts").create_dataset("text", data=np.array(list(g.prompts), dtype=object), dtype=text)
    encoded = []
    for key, value in g.attrs.items():
        if key in _STORE_ATTRS:
            raise IclError(f"circuit attribute name {key!r} is reserved; rename it")
        if value is None or isinstance(value, (list, tuple, dict)):
            f.attrs[key] = json.dumps(value)
            encoded.append(key)
        elif isinstance(value, (str, bool, int, float, np.generic)):
            f.attrs[key] = value
        else:
            raise IclError(f"circuit attribute {key}={value!r} is not a str, number, bool, list, dict or None")
    f.attrs["json_attrs"] = json.dumps(encoded)


def _plain(value: Any) -> Any:
    """An HDF5 attribute value as a Python scalar."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def read_h5(path) -> CircuitGraph:
    """The CircuitGraph stored at `path` (a circuit.h5 file, or an open h5py File)."""
    import h5py

    if isinstance(path, (h5py.File, h5py.Group)):
        return _read(path, str(getattr(path, "filename", "circuit.h5")))
    p = Path(path)
    if not p.is_file():
        raise IclError(f"{p} does not exist; give the circuit.h5 of an `icl circuit` artifact")
    try:
        with h5py.File(p, "r") as f:
            return _read(f, str(p))
    except OSError as exc:
        raise IclError(f"{p} is not an HDF5 file ({exc})") from None


def _read(f, where: str) -> CircuitGraph:
    cols: dict[str, Any] = {}
    for group, fields in (("nodes", _NODE_FIELDS), ("edges", _EDGE_FIELDS), ("sweep", _SWEEP_FIELDS)):
        for name, attr in fields.items():
            if f"{group}/{name}" not in f:
                raise IclError(f"{where} lacks {group}/{name}: not a circuit artifact (or a damaged one)")
            ds = f[f"{group}/{name}"]
            cols[attr] = _column(ds.asstr()[()] if _DTYPES[attr] is str else ds[()], attr)
    prompts = [str(t) for t in f["prompts/text"].asstr()[()]] if "prompts/text" in f else []
    encoded = set(json.loads(_plain(f.attrs["json_attrs"]))) if "json_attrs" in f.attrs else set()
    attrs = {k: json.loads(_plain(v)) if k in encoded else _plain(v)
             for k, v in f.attrs.items() if k not in _STORE_ATTRS}
    g = CircuitGraph(**cols, prompts=prompts, attrs=attrs)
    check_graph(g)
    return g
