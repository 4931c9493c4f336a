"""What both detector → executor estimands share (``link.py``: ablation through the model;
``link_frozen.py``: block l with the clean attention pattern): checks of the two SAEs, an encoder
restricted to the executor columns, unit decoder rows, pass sizes, own pairs and task weights."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from icl_cli.core.errors import IclError
from icl_cli.core.sites import HookedModel

PASS_BYTES = {"cpu": 32 * 2**20, "other": 2 * 2**30}


ELEMENTWISE = ("standard", "gated", "jumprelu")
"""Architectures whose feature f's activation depends on f's own encoder column only."""
_PER_FEATURE = ("b_enc", "W_dec", "threshold", "b_gate", "b_mag", "r_mag")


def feature_encoder(sae, ids: Sequence[int]) -> Callable[[Tensor], Tensor]:
    """fn(x [.., d_in]) -> [.., len(ids)] float activations of features ``ids`` of ``sae``.

    For an elementwise architecture a copy of the SAE cut down to these features (the encoder's
    cost falls from d_sae to len(ids) columns); otherwise (top-k) the full encoding, indexed.
    """
    from dataclasses import replace

    from icl_cli.dictionaries.base import build

    idx = torch.as_tensor(list(ids), dtype=torch.long, device=sae.W_enc.device)
    if sae.cfg.arch not in ELEMENTWISE:
        return lambda x: sae.encode(x.to(sae.W_enc.device))[..., idx].float()
    narrow = build(replace(sae.cfg, d_sae=len(ids))).to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    state = {k: v[:, idx] if k == "W_enc" else v[idx] if k in _PER_FEATURE else v for k, v in sae.state_dict().items()}
    narrow.load_state_dict(state)
    narrow.requires_grad_(False)
    return lambda x: narrow.encode(x.to(narrow.W_enc.device)).float()


def unit_rows(sae, ids: Sequence[int]) -> Tensor:
    """[n, d] float unit decoder directions W_dec[f]/‖W_dec[f]‖ of features ``ids``."""
    w = sae.W_dec[torch.as_tensor(list(ids), dtype=torch.long, device=sae.W_dec.device)].float()
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


def per_pass(n_prompts: int, n_pos: int, config, n_out: int, device) -> int:
    """Detectors per pass so that rows × positions × (a block's widest activations) fit ``PASS_BYTES``."""
    budget = PASS_BYTES["cpu" if torch.device(device).type == "cpu" else "other"]
    d = int(config.hidden_size)
    d_mlp = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d)
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1))
    per_token = 4 * (8 * d + 3 * d_mlp + heads * n_pos + 2 * n_out)  # float32 bytes
    return max(1, budget // max(1, n_prompts * n_pos * per_token))


def check_link_saes(hm: HookedModel, det_sae, detectors: Sequence[int], exe_sae, executors: Sequence[int]) -> tuple[int, int]:
    """(detector layer, executor layer) after the checks both estimands share (one-line IclErrors)."""
    ld, le = det_sae.cfg.layer, exe_sae.cfg.layer
    for sae, what in ((det_sae, "detector"), (exe_sae, "executor")):
        if sae.cfg.site != "resid_pre" or sae.cfg.layer is None:
            raise IclError(f"the {what} SAE must be a resid_pre SAE with a known layer (it is {sae.cfg.site}, layer {sae.cfg.layer})")
    if not 0 <= ld < le < hm.n_layers:
        raise IclError(f"the detectors' layer ({ld}) must come before the executors' ({le}) within the model's {hm.n_layers} layers")
    for ids, sae, what in ((detectors, det_sae, "detector"), (executors, exe_sae, "executor")):
        bad = [f for f in ids if not 0 <= f < sae.cfg.d_sae]
        if bad:
            raise IclError(f"{what} feature(s) {bad} are beyond the SAE's width {sae.cfg.d_sae}")
    if not detectors or not executors:
        raise IclError("the link needs at least one detector and one executor")
    return ld, le


def own_matrix(detectors: Sequence[int], executors: Sequence[int], own_pairs: Sequence[tuple[int, int]]) -> Tensor:
    """[D, E] bool: the pair is some task's (detector, executor)."""
    own = torch.zeros(len(detectors), len(executors), dtype=torch.bool)
    for d, e in own_pairs:
        if d in detectors and e in executors:
            own[list(detectors).index(d), list(executors).index(e)] = True
    return own


def task_weights(names: Sequence[str], executors: Sequence[int],
                 executor_tasks: Mapping[int, Sequence[str]] | None) -> Tensor:
    """[T, E] bool: task t counts for executor e (T(e); every task when not given)."""
    weights = torch.ones(len(names), len(executors), dtype=torch.bool)
    if executor_tasks is not None:
        for k, e in enumerate(executors):
            if executor_tasks.get(e):
                weights[:, k] = torch.tensor([n in executor_tasks[e] for n in names])
    return weights
