"""train-sae (and imported SAEs): the dictionary's quality (SPEC §9) and its training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icl_cli.report.base import Figure, Renderer, Section, Table, fmt, register

QUALITY = (("l0", "L0 (active features per token)", 1), ("fvu", "FVU (fraction of variance unexplained)", 3),
           ("dead_fraction", "dead features (fraction)", 3), ("ce_clean", "CE clean (nats)", 3),
           ("ce_spliced", "CE with the SAE spliced in (nats)", 3), ("ce_zero", "CE with the site zero-ablated (nats)", 3),
           ("ce_recovered", "CE loss recovered", 3))


def sae_quality(art) -> dict:
    """l0, fvu, dead_fraction, ce_* of a train-sae artifact's manifest (missing ones left out)."""
    return {k: art.metrics[k] for k, _, _ in QUALITY if art.metrics.get(k) is not None}


@register("train-sae")
class TrainSaeRenderer(Renderer):
    def build(self, art, out: Path | None) -> Section:
        p = art.params
        q = sae_quality(art)
        site = p.get("site")
        sec = Section(art.key, art.step, f"{p.get('arch')} {site} dictionary, layer {p.get('layer')} ({p.get('model')})",
                      {"layer": p.get("layer"), "site": site, "arch": p.get("arch"), "width": p.get("width"), **q})
        rows = [[label, fmt(q[k], d)] for k, label, d in QUALITY if k in q]
        rows += [["features", str(p.get("width"))], ["training tokens", f"{p.get('tokens', 0):,}"],
                 ["sparsity coefficient (L1)", str(p.get("l1"))], ["learning rate", str(p.get("lr"))]]
        sec.tables.append(Table("dictionary quality on held-out tokens", ["metric", "value"], rows,
                                caption="CE recovered = (CE zero-ablated − CE spliced) / (CE zero-ablated − CE clean)"))
        if "ce_recovered" in q:
            sec.notes.append(f"L0 {q.get('l0', float('nan')):.1f}, FVU {q.get('fvu', float('nan')):.3f}, "
                             f"CE loss recovered {q['ce_recovered']:.3f}.")
        if out is not None and "curves.h5" in art.files:
            sec.figures.append(self._curves(art, out))
        return sec

    @staticmethod
    def _curves(art, out: Path) -> Figure:
        import h5py

        from icl_cli.report.figures import plt, save

        with h5py.File(art.file("curves.h5"), "r") as f:
            c = {k: np.asarray(f[k][()]) for k in f.keys()}
        p = plt()
        fig, axes = p.subplots(1, 3, figsize=(11, 3.2))
        x = c["tokens"] / 1e6 if "tokens" in c else c["step"]
        xl = "training tokens (millions)" if "tokens" in c else "step"
        for ax, k, label in zip(axes, ("loss", "l0", "fvu"), ("training loss", "L0 (active features per token)",
                                                              "FVU (fraction of variance unexplained)")):
            if k in c:
                ax.plot(x, c[k], color="tab:blue")
            ax.set_xlabel(xl)
            ax.set_ylabel(label)
        axes[2].set_yscale("log")
        fig.suptitle(f"Training curves: {art.params.get('arch')} {art.params.get('site')} SAE, layer {art.params.get('layer')}")
        fig.tight_layout()
        files = save(fig, out, f"train-sae-{art.key[:8]}-curves")
        return Figure("SAE training curves", "Loss, L0 and FVU on the training batches as training proceeds.", files)


def suite_metrics(art) -> dict:
    """The held-out metrics a suite artifact's manifest lists for the imported dictionary ``art``."""
    import json

    for suite in art.store.artifacts("suite"):
        for label, key in suite.inputs.items():
            if key != art.key:
                continue
            kind, layer = label.rsplit(".", 1)
            manifest = json.loads(suite.file("suite.json").read_text(encoding="utf-8"))
            for e in manifest.get("dictionaries", []):
                if e.get("kind") == kind and e.get("layer") == int(layer):
                    return {k: e[k] for k, _, _ in QUALITY if e.get(k) is not None}
    return {}


@register("import-sae")
class ImportedSaeRenderer(Renderer):
    def build(self, art, out: Path | None) -> Section:
        p = {**art.params, **art.metrics}  # an import's metrics describe the dictionary (site, layer, arch, widths)
        q = {**suite_metrics(art), **sae_quality(art)}
        kind = {"resid_pre": "residual SAE", "attn_out": "attention-output SAE", "transcoder": "transcoder"}.get(p.get("site"), "dictionary")
        sec = Section(art.key, art.step, f"{p.get('arch') or ''} {kind}, layer {p.get('layer')} (imported, {p.get('model')})".strip(),
                      {"layer": p.get("layer"), "site": p.get("site"), "arch": p.get("arch"), **q})
        rows = [[label, fmt(q[k], d)] for k, label, d in QUALITY if k in q]
        rows += [[k, str(p[k])] for k in ("site", "d_in", "d_sae", "source") if p.get(k) is not None]
        sec.tables.append(Table("dictionary", ["metric", "value"], rows, align="ll",
                                caption="quality from the suite's manifest (measured when it was trained)" if q else ""))
        return sec
