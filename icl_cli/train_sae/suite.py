"""A whole dictionary suite trained at once: every kind at every layer of a TrainConfig, on one
forward pass per batch that stops after the highest layer (``dictionaries/suite_build.py`` writes
the suite's folders and manifest)."""

from __future__ import annotations

from typing import Sequence

from icl_cli.dictionaries.suite import KINDS


def train_suite(lm, cfg, kinds: Sequence[str] = KINDS, progress=None) -> list[tuple[str, int, object]]:
    """Train a dictionary of every kind at every layer of ``cfg`` (a TrainConfig) together: one
    forward pass per batch feeds them all and stops after the highest layer. Returns members
    (kind, layer, Trained) for write_suite."""
    from icl_cli.train_sae.trainer import train_dictionaries

    return [(r.site, r.layer, r) for r in train_dictionaries(cfg, lm, progress=progress, sites=list(kinds))]
