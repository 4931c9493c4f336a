"""What one feature does: greedy completions of a prompt without and with s·u_f added (SPEC §6).

    icl steer explore --sae SAE_REF --feature 123 --scale 15 --prompt "Follow the pattern:\\nhot ->"

u_f = W_dec[f] / ‖W_dec[f]‖ is added to resid_pre[l] (l = the SAE's layer) at the prompt's last
token (``where="last"``, as the heatmap adds it at the arrow) or at every position, generated
tokens included (``where="all"``). Each new token is the argmax of the next-token logits; every
step reruns the whole sequence, so the edit sits at the same token throughout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from icl_cli.core.sites import HookedModel, Site, add_at
from icl_cli.core.errors import IclError
from icl_cli.steer.heatmaps import unit_directions

WHERE = ("last", "all")


class Completion(NamedTuple):
    plain: str
    steered: str
    plain_ids: list[int]
    steered_ids: list[int]


@torch.no_grad()
def greedy(hm: HookedModel, input_ids: torch.Tensor, max_new_tokens: int, layer: int | None = None,
           vector: torch.Tensor | None = None, where: str = "last", eos: int | None = None) -> list[int]:
    """Greedy continuation of input_ids [1, P] (new token ids); with ``vector`` [D] added at
    resid_pre[layer] at the prompt's last token or at every position."""
    ids = input_ids
    P = ids.shape[1]
    new: list[int] = []
    for _ in range(max_new_tokens):
        edit = {}
        if vector is not None:
            mask = torch.zeros_like(ids, dtype=torch.bool)
            if where == "last":
                mask[:, P - 1] = True
            else:
                mask[:] = True
            edit = {Site("resid_pre", layer): add_at(vector, mask)}
        logits = hm.run(ids, torch.ones_like(ids), edit=edit).logits
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        if eos is not None and nxt == eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
    return new


def explore(hm: HookedModel, tokenizer, sae, feature: int, scale: float, prompt: str, max_new_tokens: int = 10,
            where: str = "last", device=None) -> Completion:
    """Greedy completions of ``prompt`` without and with s·u_feature at the SAE's layer."""
    if not math.isfinite(scale):
        raise IclError(f"--scale must be a finite number, got {scale}")
    if where not in WHERE:
        raise IclError(f"--where must be one of {', '.join(WHERE)}, got {where!r}")
    if max_new_tokens < 1:
        raise IclError("--max-new-tokens must be ≥ 1")
    if not prompt:
        raise IclError("--prompt is empty; give the text to complete")
    layer = sae.cfg.layer
    if layer is None or not 0 <= layer < hm.n_layers:
        raise IclError(f"the SAE's layer {layer} is not a layer of the model (0-{hm.n_layers - 1})")
    u = unit_directions(sae, [feature])[0]
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device or "cpu")
    eos = getattr(tokenizer, "eos_token_id", None)
    plain = greedy(hm, ids, max_new_tokens, eos=eos)
    steered = greedy(hm, ids, max_new_tokens, layer, scale * u, where, eos)
    dec = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    return Completion(dec(plain), dec(steered), plain, steered)
