"""The spliced model (SPEC §7; Marks et al. 2024, §2): every chosen site written as its
dictionary's reconstruction plus an error term, so that the output is unchanged and gradients
reach every feature activation and every error.

1. A dictionary key is (kind, layer) with kind in ``graph.NODE_SITES``: ``resid`` reads and
   writes resid_pre[l], ``attn`` attn_out[l], ``transcoder`` reads mlp_in[l] and writes
   mlp_out[l]. ``splice_edits`` turns one handler ``fn(key, x_in, x_out) -> x_out'`` into
   HookedModel edits (the transcoder's input is stashed by an identity edit at mlp_in).
2. At a site, a = encode(x_in) [B,P,F] and e = x_out − decode(a) [B,P,D], so x_out = decode(a) + e.
3. ``Transparent`` (one backward for every node): a and e become leaves and the site writes
   decode(a) + e + (x_out − x_out.detach()). The last term is an exact zero in the forward pass
   and an identity in the backward pass, so upstream nodes see the gradient of the unmodified
   model (downstream dictionaries are transparent, their errors absorb any change) while
   ∂m/∂a = ∂m/∂x_out · W_decᵀ and ∂m/∂e = ∂m/∂x_out.
4. ``Ablating``: features marked in a per-group table are set to their baseline at the tokens
   of that group; the error is the current one (e = x_out − decode(encode(x_in)) of this very
   pass), so error nodes are kept (Marks et al.'s faithfulness).
5. Token groups: a node's role (SPEC §2), per-position its position, or with prompt positions
   its role with the instruction split into one group per token (the authors' ``prompt_i``
   masks); tokens without a role (BOS, inner tokens of multi-token words) and padding belong to
   no group: they are never ablated and never scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor

from icl_cli.circuit.graph import NODE_SITES
from icl_cli.core.batch import PromptBatch
from icl_cli.core.prompts import ROLES
from icl_cli.core.sites import Site

Key = tuple[str, int]
"""(kind, layer): kind in NODE_SITES."""
Handler = Callable[[Key, Tensor, Tensor], Tensor]

SITE_OF = {"resid": ("resid_pre", "resid_pre"), "attn": ("attn_out", "attn_out"), "transcoder": ("mlp_in", "mlp_out")}
"""kind -> (site read by the dictionary, site it writes)."""


def ordered(keys) -> list[Key]:
    """Keys in the order they act in the forward pass: by layer, then resid, attn, transcoder."""
    return sorted(keys, key=lambda k: (k[1], NODE_SITES.index(k[0])))


def splice_edits(keys, handler: Handler) -> dict[Site, Callable[[Tensor], Tensor]]:
    """HookedModel edits that call ``handler(key, x_in, x_out)`` at each dictionary site."""
    edits: dict[Site, Callable[[Tensor], Tensor]] = {}
    for key in keys:
        kind, layer = key
        read, write = SITE_OF[kind]
        if read == write:
            edits[Site(write, layer)] = lambda x, key=key: handler(key, x, x)
        else:
            stash: dict[str, Tensor] = {}

            def keep(x: Tensor, stash=stash) -> Tensor:
                stash["x"] = x
                return x

            edits[Site(read, layer)] = keep
            edits[Site(write, layer)] = lambda y, key=key, stash=stash: handler(key, stash.pop("x"), y)
    return edits


@dataclass
class Groups:
    """Token groups that nodes aggregate over: ``index`` [B,P] long, -1 = no group."""

    names: list[str]
    index: Tensor

    @classmethod
    def of(cls, batch: PromptBatch, per_position: bool = False, prompt_positions: bool = False) -> "Groups":
        """Groups by role (``ROLES``), by position (``pos:<i>``), or by role with the instruction
        split into one group per token (``prompt:<k>``: the k-th instruction token of each prompt).

        A prompt's first token is never a node: with a start-of-sequence token it has no role anyway,
        and without one (SmolLM2) the first word becomes the attention sink, with a residual ~100×
        the others' that no dictionary was trained on (suites skip it), so it is left out like BOS."""
        has_role = (batch.roles > 0) & (batch.attention_mask > 0)
        has_role[:, 0] = False
        if per_position:
            P = batch.input_ids.shape[1]
            idx = torch.arange(P, device=batch.roles.device).expand_as(batch.roles)
            return cls([f"pos:{i}" for i in range(P)], torch.where(has_role, idx, -1))
        role = torch.where(has_role, batch.roles.long() - 1, -1)  # ROLES[0] is "prompt"
        if not prompt_positions:
            return cls(list(ROLES), role)
        in_prompt = role == 0
        K = int(in_prompt.sum(1).max()) if in_prompt.numel() else 0
        k = in_prompt.long().cumsum(1) - 1  # rank of each instruction token within its prompt
        idx = torch.where(in_prompt, k, torch.where(role > 0, role - 1 + K, -1))
        return cls([f"prompt:{i}" for i in range(K)] + list(ROLES[1:]), idx)

    @property
    def n(self) -> int:
        return len(self.names)

    def onehot(self, dtype=torch.float32) -> Tensor:
        """[B,P,G]: 1 where the token belongs to the group."""
        G = torch.arange(self.n, device=self.index.device)
        return (self.index[..., None] == G).to(dtype)

    def repeat(self, n: int) -> "Groups":
        """The groups of a batch tiled ``n`` times along the batch axis."""
        return Groups(self.names, self.index.repeat(n, 1))

    def sum(self, x: Tensor) -> Tensor:
        """x [B,P,...] -> [G,...]: the sum over the tokens of each group."""
        oh = self.onehot(x.dtype)
        return torch.einsum("bpg,bp...->g...", oh, x)

    def expand(self, table: Tensor) -> Tensor:
        """table [G,...] -> [B,P,...]: each token gets its group's row (zeros outside groups)."""
        oh = self.onehot(table.dtype)
        return torch.einsum("bpg,g...->bp...", oh, table)


@dataclass
class Baseline:
    """a′ and e′ per group: ``a[key]`` [G,F], ``e[key]`` [G,D] (zeros, or the group's mean)."""

    a: dict[Key, Tensor]
    e: dict[Key, Tensor]

    @classmethod
    def of(cls, kind: str, groups: Groups, acts: Mapping[Key, tuple[Tensor, Tensor]]) -> "Baseline":
        """kind "zero" or "mean" (the mean over the tokens of each group, over prompts)."""
        if kind == "zero":
            return cls({k: a.new_zeros(groups.n, a.shape[-1]) for k, (a, _) in acts.items()},
                       {k: e.new_zeros(groups.n, e.shape[-1]) for k, (_, e) in acts.items()})
        count = groups.onehot().sum((0, 1)).clamp(min=1)[:, None]  # [G,1]
        return cls({k: groups.sum(a.float()) / count for k, (a, _) in acts.items()},
                   {k: groups.sum(e.float()) / count for k, (_, e) in acts.items()})


def split(d, x_in: Tensor, x_out: Tensor) -> tuple[Tensor, Tensor]:
    """(a [..,F], e [..,D]) with x_out = decode(a) + e, in the dictionary's dtype."""
    a = d.encode(x_in)
    return a, x_out.to(a.dtype) - d.decode(a)


@dataclass
class Transparent:
    """Handler of step 3: records leaves ``acts[key] = (a, e)`` (requires_grad) and x_in."""

    dicts: Mapping[Key, object]
    acts: dict[Key, tuple[Tensor, Tensor]] = field(default_factory=dict)
    inputs: dict[Key, Tensor] = field(default_factory=dict)

    def __call__(self, key: Key, x_in: Tensor, x_out: Tensor) -> Tensor:
        d = self.dicts[key]
        with torch.no_grad():
            a, e = split(d, x_in, x_out)
        a, e = a.requires_grad_(), e.requires_grad_()
        self.acts[key] = (a, e)
        self.inputs[key] = x_in.detach()
        return d.decode(a) + e + (x_out - x_out.detach()).to(a.dtype)


@dataclass
class Ablating:
    """Handler of step 4: ``ablate[key]`` [G,F] bool marks the (group, feature) nodes set to
    ``base.a[key]``; sites with nothing to ablate are left untouched."""

    dicts: Mapping[Key, object]
    groups: Groups
    base: Baseline
    ablate: Mapping[Key, Tensor]

    def __call__(self, key: Key, x_in: Tensor, x_out: Tensor) -> Tensor:
        mask = self.ablate.get(key)
        if mask is None or not bool(mask.any()):
            return x_out
        d = self.dicts[key]
        a, e = split(d, x_in, x_out)
        reps = a.shape[0] // self.groups.index.shape[0]
        groups = self.groups.repeat(reps) if reps > 1 else self.groups
        m = groups.expand(mask.to(a.dtype))  # [B,P,F] 1 where ablated
        a = a - m * (a - groups.expand(self.base.a[key].to(a.dtype)))
        return d.decode(a) + e


def repeat_batch(batch: PromptBatch, n: int) -> PromptBatch:
    """The batch tiled ``n`` times along the batch axis (for IG steps and batched edges)."""
    from dataclasses import fields

    return PromptBatch(**{f.name: getattr(batch, f.name).repeat(n, *([1] * (getattr(batch, f.name).dim() - 1)))
                          for f in fields(batch)})
