"""Node indirect effects (SPEC §7; Marks et al. 2024, §2.2; Syed et al. 2023 for attribution
patching; Sundararajan et al. 2017 for integrated gradients).

1. Clean pass: one forward pass of the spliced model in ``Transparent`` mode and one backward of
   m = all_pairs_logprob give a, e and ∂m/∂a, ∂m/∂e at every site (splice.py, step 3).
2. Baseline a′, e′: zero, or the mean over the tokens of each group (role) and prompts.
3. Attribution patching (atp): IE(node) = Σ_{prompts, tokens of the node's group} (a − a′)·∂m/∂a;
   error node: Σ ⟨∂m/∂e, e − e′⟩. Positive IE: the node supports the metric (m drops when the
   node is ablated), since m(a) − m(a′) ≈ (a − a′)·∂m/∂a.
4. Integrated gradients (ig, N steps): per site, the site's features and error are moved together
   along a′ + α(a − a′), α = (k + ½)/N (midpoint rule), the other sites left as they are, and
   IE = (a − a′)·mean_k ∂m/∂a(α_k) (Marks et al.'s per-submodule IG). The N steps run as one
   batched pass (the prompt batch tiled N times), from the site's layer onwards only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from icl_cli.circuit.splice import (Baseline, Groups, Key, SITE_OF, Transparent, ordered, repeat_batch,
                                    splice_edits)
from icl_cli.core.batch import PromptBatch
from icl_cli.core.metrics import all_pairs_logprob
from icl_cli.core.sites import HookedModel, Site


@dataclass
class NodeScores:
    """Everything the later steps need about the nodes of one batch of prompts."""

    keys: list[Key]
    groups: Groups
    base: Baseline
    m: float
    """all_pairs_logprob of the unmodified model."""
    clean: dict[Key, tuple[Tensor, Tensor]]
    """(a [B,P,F], e [B,P,D]) at every site, detached."""
    grads: dict[Key, tuple[Tensor, Tensor]]
    """(∂m/∂a, ∂m/∂e) at the clean point, same shapes."""
    resid: dict[int, Tensor]
    """resid_pre[l] [B,P,D] of the unmodified model, for passes that start at layer l."""
    ie: dict[Key, Tensor]
    """[G,F] indirect effect of each feature node."""
    ie_err: dict[Key, Tensor]
    """[G] indirect effect of each error node."""
    act: dict[Key, Tensor]
    """[G,F] mean activation over the group's tokens."""
    err_norm: dict[Key, Tensor]
    """[G] mean norm of the error over the group's tokens."""


def clean_pass(hm: HookedModel, batch: PromptBatch, dicts: Mapping[Key, object], groups: Groups,
               baseline: str = "zero") -> NodeScores:
    """Steps 1-3: one forward and one backward for every node (attribution patching)."""
    keys = ordered(dicts)
    layers = sorted({l for _, l in keys})
    h = Transparent(dicts)
    out = hm.run(batch.input_ids, batch.attention_mask, read=[Site("resid_pre", l) for l in layers],
                 edit=splice_edits(keys, h), grad=True)
    m = all_pairs_logprob(out.logits, batch)
    leaves = [t for k in keys for t in h.acts[k]]
    gs = torch.autograd.grad(m, leaves, allow_unused=True)
    gs = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, gs)]
    clean = {k: (a.detach(), e.detach()) for k, (a, e) in h.acts.items()}
    grads = {k: (gs[2 * i], gs[2 * i + 1]) for i, k in enumerate(keys)}
    resid = {l: h.inputs[("resid", l)] if ("resid", l) in h.inputs else out.acts[Site("resid_pre", l)].detach()
             for l in layers}
    base = Baseline.of(baseline, groups, clean)
    count = groups.onehot().sum((0, 1)).clamp(min=1)  # [G]
    ie, ie_err, act, err_norm = {}, {}, {}, {}
    for k in keys:
        a, e = clean[k]
        ga, ge = grads[k]
        ie[k] = groups.sum((a - groups.expand(base.a[k])) * ga)
        ie_err[k] = groups.sum(((e - groups.expand(base.e[k])) * ge).sum(-1))
        act[k] = groups.sum(a) / count[:, None]
        err_norm[k] = groups.sum(e.norm(dim=-1)) / count
    return NodeScores(keys, groups, base, float(m.detach()), clean, grads, resid, ie, ie_err, act, err_norm)


def integrated_gradients(hm: HookedModel, batch: PromptBatch, dicts: Mapping[Key, object], s: NodeScores,
                         steps: int = 10, max_rows: int = 256,
                         progress: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """Step 4: (ie [G,F], ie_err [G]) per site by integrated gradients with ``steps`` steps.

    The N·B rows of a site run in chunks of at most ``max_rows`` rows (whole copies of the batch).
    """
    B = len(batch)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    per_chunk = max(1, max_rows // max(B, 1))
    ie, ie_err = {}, {}
    for key in s.keys:
        if progress:
            progress(f"IG {key[0]}.{key[1]}")
        d = dicts[key]
        a, e = s.clean[key]
        ba, be = s.groups.expand(s.base.a[key]), s.groups.expand(s.base.e[key])
        ga_sum, ge_sum = torch.zeros_like(a), torch.zeros_like(e)
        for lo in range(0, steps, per_chunk):
            al = alphas[lo:lo + per_chunk].to(a.device)
            n = len(al)
            coef = al.repeat_interleave(B)[:, None, None]  # [n·B,1,1], copy k uses α_k
            a_al = (ba.repeat(n, 1, 1) + coef * (a - ba).repeat(n, 1, 1)).requires_grad_()
            e_al = (be.repeat(n, 1, 1) + coef * (e - be).repeat(n, 1, 1)).requires_grad_()

            def at_site(k, x_in, x_out, a_al=a_al, e_al=e_al):
                return d.decode(a_al) + e_al

            rb = repeat_batch(batch, n)
            layer = key[1]
            out = hm.run(rb.input_ids, rb.attention_mask, edit=splice_edits([key], at_site),
                         start_at=layer, start_resid=s.resid[layer].repeat(n, 1, 1), grad=True)
            # mean over n·B rows = (1/n) Σ_k m_k, so n·grad of copy k = ∂m_k/∂a
            m = all_pairs_logprob(out.logits, rb)
            ga, ge = torch.autograd.grad(m, [a_al, e_al])
            ga_sum += (ga * n).view(n, *a.shape).sum(0)
            ge_sum += (ge * n).view(n, *e.shape).sum(0)
        ie[key] = s.groups.sum((a - ba) * ga_sum / steps)
        ie_err[key] = s.groups.sum(((e - be) * ge_sum / steps).sum(-1))
    return ie, ie_err


def node_scores(hm: HookedModel, batch: PromptBatch, dicts: Mapping[Key, object], method: str = "atp",
                baseline: str = "zero", per_position: bool = False, ig_steps: int = 10, max_rows: int = 256,
                progress: Callable[[str], None] | None = None, prompt_positions: bool = False) -> NodeScores:
    """Node IEs by ``method`` (atp | ig) against ``baseline`` (zero | mean), grouped by role or
    position (``prompt_positions``: one ``prompt`` group per instruction token)."""
    groups = Groups.of(batch, per_position, prompt_positions)
    s = clean_pass(hm, batch, dicts, groups, baseline)
    if method == "ig":
        s.ie, s.ie_err = integrated_gradients(hm, batch, dicts, s, ig_steps, max_rows, progress)
    return s


def site_of(key: Key) -> Site:
    """The site a dictionary writes."""
    return Site(SITE_OF[key[0]][1], key[1])
