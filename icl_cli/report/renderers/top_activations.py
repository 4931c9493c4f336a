"""top-activations: the stored max-activating contexts of each feature (SPEC §8)."""

from __future__ import annotations

from pathlib import Path

from icl_cli.report.base import Renderer, Section, register


@register("top-activations")
class TopActivationsRenderer(Renderer):
    def build(self, art, out: Path | None) -> Section:
        from icl_cli.report.contexts import feature_contexts
        from icl_cli.collect.top_activations import read_h5

        feats, _ = read_h5(art.file("top_activations.h5"))
        found = feature_contexts(art.store, art.inputs.get("sae"), feats, n_rows=art.params.get("n_top", 10)) if art.inputs.get("sae") else {}
        sec = Section(art.key, art.step, f"Max-activating contexts of {len(feats)} features", {"features": feats})
        sec.contexts = [found[f] for f in feats if f in found]
        sec.notes.append(f"{art.params.get('n_tokens', 0):,} tokens of {art.params.get('dataset')} scanned in chunks of "
                         f"{art.params.get('ctx')} tokens.")
        return sec
