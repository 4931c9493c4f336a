"""Max-activating contexts of features, looked up in the store's top-activations artifacts.

``feature_contexts(store, sae_key, features)`` reads every ``top-activations`` artifact made
from that SAE and returns, for each requested feature that one of them holds, its top contexts
as token strings (the model's tokenizer is loaded once per model; no weights are read).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from icl_cli.report.base import Contexts


@lru_cache(maxsize=4)
def _tokenizer(model: str):
    from icl_cli.core.models import load_tokenizer

    return load_tokenizer(model)


def _clean(tok: str) -> str:
    return tok.replace("\n", "⏎").replace("▁", " ").replace("Ġ", " ").strip() or "␣"


def feature_contexts(store, sae_key: str, features: Sequence[int], n_rows: int = 5, window: int = 12) -> dict[int, Contexts]:
    """feature -> its top contexts, from the top-activations artifacts of SAE ``sae_key``."""
    from icl_cli.collect.top_activations import contexts, read_h5

    wanted = set(int(f) for f in features)
    found: dict[int, Contexts] = {}
    for art in store.artifacts("top-activations"):
        if art.inputs.get("sae") != sae_key or not wanted - set(found):
            continue
        feats, r = read_h5(art.file("top_activations.h5"))
        take = [f for f in feats if f in wanted and f not in found]
        if not take:
            continue
        tok = _tokenizer(art.params.get("model") or "toy-icl")
        for f, rows in contexts(tok, feats, r, window=window).items():
            if f in take:
                found[f] = Contexts(f"feature {f}: top contexts ({art.params.get('dataset')}, top-activations {art.key[:8]})",
                                    [(row["value"], [_clean(t) for t in row["tokens"]], row["fire"]) for row in rows[:n_rows]],
                                    feature=f, sae=sae_key)
    return found
