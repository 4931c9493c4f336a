"""Hook sites (SPEC §1): read, replace, add to or insert a module at six points of every block.

    hm = HookedModel(model)
    out = hm.run(ids, mask, read=[Site.parse("resid_pre.3")],
                 edit={Site("resid_pre", 3): add_at(tv, arrow_mask)})
    out.logits  # [B,P,V];  out.acts[Site("resid_pre", 3)]  # [B,P,D], after the edit

How each site is reached (module names come from ``arch.py``):

1. ``resid_pre[l]``  forward pre-hook on block l (its ``hidden_states`` input).
2. ``attn_out[l]``   forward hook on the last module of the attention branch.
3. ``resid_mid[l]``  not a module output: read as ``resid_pre + attn_out``; an edit fn is applied
   to that sum and the difference is folded into ``attn_out`` (``attn_out += fn(mid) - mid``),
   so the stream after the block's first residual add is ``fn(mid)`` up to one rounding. An
   identity edit adds an exact zero, so no-op insertions stay bit-identical.
4. ``mlp_in[l]``     forward pre-hook on the MLP (its input is the pre-MLP norm's output).
5. ``mlp_out[l]``    forward hook on the last module of the MLP branch.
6. ``resid_post[l]`` forward hook on block l (its output). It is the same tensor as
   ``resid_pre[l+1]``: an edit at ``resid_pre[l+1]`` is seen by a read of ``resid_post[l]``.

Early exit raises a private exception from block ``stop_after``'s hook: its forward hook, or its
pre-hook when only ``resid_pre`` is read or edited at that layer (nothing of the block itself is
needed, so it does not run); ``start_at`` turns the
earlier blocks into pass-throughs for one call and swaps the given residual in at block
``start_at``. Hooks and patches are removed in ``finally`` blocks, whatever happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from icl_cli.core.arch import locate, model_family
from icl_cli.core.placement import input_device
from icl_cli.core.errors import IclError

SITE_KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")

Edit = Callable[[Tensor], Tensor]
"""fn(x [B,P,D]) -> x' [B,P,D]: the value that replaces the site's tensor."""


@dataclass(frozen=True)
class Site:
    """One hook point: ``kind`` in SITE_KINDS at decoder block ``layer`` (0-based)."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise IclError(f"unknown site kind {self.kind!r}; use one of {', '.join(SITE_KINDS)}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise IclError(f"site layer must be an integer >= 0, got {self.layer!r}")

    @classmethod
    def parse(cls, text: "str | Site") -> "Site":
        """``"resid_pre.3"`` (or ``"resid_pre[3]"``) -> Site("resid_pre", 3)."""
        if isinstance(text, Site):
            return text
        s = text.strip().replace("[", ".").rstrip("]")
        kind, _, layer = s.rpartition(".")
        if not kind or not layer.isdigit():
            raise IclError(f"cannot read site {text!r}; write it as KIND.LAYER, e.g. resid_pre.12")
        return cls(kind, int(layer))

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"


class Acts(dict):
    """Site -> tensor; also accepts the string form (``acts["resid_pre.3"]``)."""

    def __getitem__(self, key: "Site | str") -> Tensor:
        return super().__getitem__(Site.parse(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(Site.parse(key) if isinstance(key, str) else key)


class RunOut(NamedTuple):
    logits: Tensor | None
    """[B,P,V], or None when the pass stopped early."""
    acts: Acts
    """Every site that was read, [B,P,D], as it was after its edit."""


class _Stop(Exception):
    """Raised inside the forward pass to leave it after block ``stop_after``."""


@dataclass
class _Pass:
    """State shared by the hooks of one ``run`` call."""

    read: set
    edit: Mapping
    grad: bool
    start_at: int | None
    start_resid: Tensor | None
    stop_after: int | None
    acts: Acts = field(default_factory=Acts)
    resid_pre: dict = field(default_factory=dict)  # layer -> resid_pre, kept for resid_mid

    def apply(self, site: Site, x: Tensor) -> Tensor:
        fn = self.edit.get(site)
        if fn is not None:
            x = _checked(site, x, fn(x))
        if site in self.read:
            x = self.graph_node(x)
            self.acts[site] = x
        return x

    def graph_node(self, x: Tensor) -> Tensor:
        """With grad on, a read that nothing upstream makes differentiable becomes a leaf that
        requires grad, so ``autograd.grad(loss, out.acts[site])`` works for every read."""
        if self.grad and not x.requires_grad:
            return x.detach().requires_grad_()
        return x


def _checked(site: Site, x: Tensor, y: Tensor) -> Tensor:
    if not isinstance(y, Tensor) or y.shape != x.shape:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise IclError(f"the edit at {site} returned {shape}; it must return a tensor of shape {tuple(x.shape)}")
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _with_hidden(args: tuple, kwargs: dict, x: Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": x}
    return (x, *args[1:]), kwargs


def _passthrough(*args, **kwargs):
    """Stands in for a skipped block's forward: returns its input unchanged."""
    return _hidden(args, kwargs)


class HookedModel:
    """A HF causal LM with read / edit access to the six sites of every block (SPEC §1)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = model_family(model)
        self._loc = locate(model)
        self.n_layers = len(self._loc.blocks)
        self.d_model = int(model.config.hidden_size)

    def sites(self, kinds: Iterable[str] = SITE_KINDS, layers: Iterable[int] | None = None) -> list[Site]:
        """Every site of the given kinds at the given layers (default: all layers), layer-major."""
        layers = range(self.n_layers) if layers is None else layers
        return [Site(k, l) for l in layers for k in kinds]

    def run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        read: Iterable["Site | str"] = (),
        edit: Mapping["Site | str", Edit] | None = None,
        stop_after: int | None = None,
        start_at: int | None = None,
        start_resid: Tensor | None = None,
        grad: bool = False,
    ) -> RunOut:
        """One forward pass with reads and edits.

        input_ids, attention_mask: [B,P]. read: sites to return. edit: site -> fn(x)->x'.
        stop_after: last block whose sites are needed; the pass ends there (logits None), before
        the block runs when only its resid_pre is involved. start_at + start_resid [B,P,D]: run only
        blocks >= start_at from the given resid_pre[start_at] (earlier blocks are skipped).
        grad: build the autograd graph (reads keep it); otherwise run under no_grad.
        """
        st = _Pass(
            read={Site.parse(s) for s in read},
            edit={Site.parse(s): fn for s, fn in (edit or {}).items()},
            grad=grad,
            start_at=start_at,
            start_resid=start_resid,
            stop_after=stop_after,
        )
        self._check(st, input_ids)
        device = input_device(self.model)  # with a device map: the embedding's execution device
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)

        handles: list = []
        skipped: list = []
        try:
            self._install(st, handles, skipped)
            with torch.enable_grad() if grad else torch.no_grad():
                try:
                    logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                except _Stop:
                    logits = None
        finally:
            for h in handles:
                h.remove()
            for block, old in skipped:
                if old is None:
                    del block.forward
                else:
                    block.forward = old
        return RunOut(logits, st.acts)

    # ---------------------------------------------------------------- internals

    def _check(self, st: _Pass, input_ids: Tensor) -> None:
        n = self.n_layers
        sites = st.read | set(st.edit)
        for s in sites:
            if s.layer >= n:
                raise IclError(f"site {s} is out of range: the model has layers 0..{n - 1}")
        if st.stop_after is not None:
            if not 0 <= st.stop_after < n:
                raise IclError(f"stop_after={st.stop_after} is out of range 0..{n - 1}")
            late = [str(s) for s in sites if s.layer > st.stop_after]
            if late:
                raise IclError(f"sites {', '.join(sorted(late))} lie after stop_after={st.stop_after}")
        if (st.start_at is None) != (st.start_resid is None):
            raise IclError("start_at and start_resid go together: pass both or neither")
        if st.start_at is not None:
            if not 0 <= st.start_at < n:
                raise IclError(f"start_at={st.start_at} is out of range 0..{n - 1}")
            if st.stop_after is not None and st.stop_after < st.start_at:
                raise IclError(f"stop_after={st.stop_after} comes before start_at={st.start_at}")
            early = [str(s) for s in sites if s.layer < st.start_at]
            if early:
                raise IclError(f"sites {', '.join(sorted(early))} lie before start_at={st.start_at}")
            want = (*input_ids.shape, self.d_model)
            if tuple(st.start_resid.shape) != want:
                raise IclError(f"start_resid has shape {tuple(st.start_resid.shape)}; expected {want}")

    def _install(self, st: _Pass, handles: list, skipped: list) -> None:
        involved = st.read | set(st.edit)
        kinds_at: dict[int, set[str]] = {}
        for s in involved:
            kinds_at.setdefault(s.layer, set()).add(s.kind)
        first = st.start_at or 0
        last = self.n_layers - 1 if st.stop_after is None else st.stop_after

        for l, parts in enumerate(self._loc.blocks):
            if l < first:
                skipped.append((parts.block, parts.block.__dict__.get("forward")))
                parts.block.forward = _passthrough
                continue
            if l > last:
                break
            kinds = kinds_at.get(l, set())
            stop_before = l == st.stop_after and kinds <= {"resid_pre"}  # block l itself is not needed
            if l == st.start_at or kinds & {"resid_pre", "resid_mid"} or stop_before:
                handles.append(parts.block.register_forward_pre_hook(_block_pre(st, l, stop_before), with_kwargs=True))
            if kinds & {"attn_out", "resid_mid"}:
                handles.append(parts.attn_out.register_forward_hook(_attn_out(st, l)))
            if "mlp_in" in kinds:
                handles.append(parts.mlp.register_forward_pre_hook(_mlp_in(st, l), with_kwargs=True))
            if "mlp_out" in kinds:
                handles.append(parts.mlp_out.register_forward_hook(_mlp_out(st, l)))
            if "resid_post" in kinds or (l == st.stop_after and not stop_before):
                handles.append(parts.block.register_forward_hook(_block_post(st, l)))


# Hook factories: each closes over the pass state and its layer.

def _block_pre(st: _Pass, l: int, stop: bool = False):
    site, prev = Site("resid_pre", l), Site("resid_post", l - 1) if l > 0 else None

    def hook(module, args, kwargs):
        x = _hidden(args, kwargs)
        if l == st.start_at:
            x = st.start_resid.to(device=x.device, dtype=x.dtype)
        x = st.apply(site, x)
        if prev is not None and prev in st.acts:
            st.acts[prev] = x  # resid_post[l-1] is resid_pre[l]: show it after this edit too
        st.resid_pre[l] = x
        if stop:
            raise _Stop
        return _with_hidden(args, kwargs, x)

    return hook


def _attn_out(st: _Pass, l: int):
    site, mid = Site("attn_out", l), Site("resid_mid", l)

    def hook(module, args, output):
        is_tuple = isinstance(output, tuple)
        x = st.apply(site, output[0] if is_tuple else output)
        fn = st.edit.get(mid)
        if fn is not None or mid in st.read:
            rm = st.resid_pre[l] + x  # the same add the block performs next
            if fn is not None or st.grad:
                # A distinct autograd node, so a read of resid_mid gets its own gradient.
                inp = st.graph_node(rm.view_as(rm)) if st.grad else rm
                new = _checked(mid, rm, fn(inp)) if fn is not None else inp
                x = x + (new - rm)  # the block then computes resid_pre + x == new
                rm = new
            if mid in st.read:
                st.acts[mid] = rm
        return (x, *output[1:]) if is_tuple else x

    return hook


def _mlp_in(st: _Pass, l: int):
    site = Site("mlp_in", l)

    def hook(module, args, kwargs):
        return _with_hidden(args, kwargs, st.apply(site, _hidden(args, kwargs)))

    return hook


def _mlp_out(st: _Pass, l: int):
    site = Site("mlp_out", l)

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (st.apply(site, output[0]), *output[1:])
        return st.apply(site, output)

    return hook


def _block_post(st: _Pass, l: int):
    site = Site("resid_post", l)

    def hook(module, args, output):
        is_tuple = isinstance(output, tuple)
        x = st.apply(site, output[0] if is_tuple else output)
        if l == st.stop_after:
            raise _Stop
        return (x, *output[1:]) if is_tuple else x

    return hook


# ---------------------------------------------------------------- edit helpers

def _per_row(vector: Tensor, x: Tensor) -> Tensor:
    """[D] or [B,D] -> [B or 1, 1, D] in x's dtype and device."""
    v = vector.to(device=x.device, dtype=x.dtype)
    return v.reshape(1, 1, -1) if v.dim() == 1 else v[:, None, :]


def add_at(vector: Tensor, mask: Tensor | None = None, scale: float = 1.0) -> Edit:
    """Edit that adds ``scale * vector`` ([D] or [B,D]) where ``mask`` ([B,P] bool) is true.

    mask None adds at every position. Gradients flow to ``vector``.
    """

    def fn(x: Tensor) -> Tensor:
        delta = scale * _per_row(vector, x)
        if mask is None:
            return x + delta
        return x + mask.to(x.device)[..., None].to(x.dtype) * delta

    return fn


def replace_at(vector: Tensor, mask: Tensor) -> Edit:
    """Edit that replaces the site's value with ``vector`` ([D] or [B,D]) where ``mask`` is true."""

    def fn(x: Tensor) -> Tensor:
        return torch.where(mask.to(x.device)[..., None], _per_row(vector, x), x)

    return fn
