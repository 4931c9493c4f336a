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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
