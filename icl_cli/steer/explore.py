"""What one feature does: greedy completions of a prompt without and with s·u_f added (SPEC §6),
and the next-token probabilities of the answer and of the top tokens, so an effect that does not
flip the greedy token still shows.

    icl steer explore --sae SAE_REF --feature 123 --scale 15 --prompt "Follow the pattern:\\nhot ->" --answer cold

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
    probs: tuple = ()
    """(token id, p without, p with steering) of the first new token: the answer's first token (when
    given) and the top tokens of either distribution, largest change first."""
    answer_id: int | None = None
    """The answer's first token (None: no answer given)."""


@torch.no_grad()
def next_token_probs(hm: HookedModel, input_ids: torch.Tensor, layer: int, vector: torch.Tensor, where: str = "last",
                     answer_id: int | None = None, top: int = 5) -> list[tuple[int, float, float]]:
    """(id, p plain, p steered) at the position after input_ids [1, P] for the answer's token and
    the ``top`` most likely tokens of each run, sorted by |p steered − p plain|, largest first."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    if where == "last":
        mask[:, -1] = True
    else:
        mask[:] = True
    ones = torch.ones_like(input_ids)
    plain = hm.run(input_ids, ones).logits[0, -1].float().softmax(-1)  # [V]
    steered = hm.run(input_ids, ones, edit={Site("resid_pre", layer): add_at(vector, mask)}).logits[0, -1].float().softmax(-1)
    ids = list(dict.fromkeys(([answer_id] if answer_id is not None else []) + plain.topk(top).indices.tolist()
                             + steered.topk(top).indices.tolist()))
    rows = [(i, float(plain[i]), float(steered[i])) for i in ids]
    return sorted(rows, key=lambda r: -abs(r[2] - r[1]))


def answer_token(tokenizer, prompt: str, answer: str) -> int:
    """The first token of ``answer`` as it follows ``prompt`` (" word" after "x ->", as in the
    task prompts; a BPE tokenizer gives the word with its leading space)."""
    sep = "" if not prompt or prompt[-1].isspace() else " "
    head = tokenizer(prompt).input_ids
    full = tokenizer(prompt + sep + answer).input_ids
    if len(full) <= len(head) or full[:len(head)] != head:
        raise IclError(f"cannot find the first token of --answer {answer!r} after the prompt (the tokenizer merges it "
                       "with the prompt's end); end the prompt with a space or pass another answer")
    return int(full[len(head)])


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
            where: str = "last", device=None, answer: str | None = None) -> Completion:
    """Greedy completions of ``prompt`` without and with s·u_feature at the SAE's layer, and the
    next-token probabilities of ``answer``'s first token and of the top tokens."""
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
    answer_id = answer_token(tokenizer, prompt, answer) if answer else None
    probs = next_token_probs(hm, ids, layer, scale * u, where, answer_id)
    dec = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    return Completion(dec(plain), dec(steered), plain, steered, tuple(probs), answer_id)
