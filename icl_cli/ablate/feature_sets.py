"""Feature sets for ``icl ablate``: from a steer artifact, a clean artifact, or ids given by hand.

    src = resolve_features(store, "pipeline-steer", sae_refs=[])           # executors / detectors per task
    src = resolve_features(store, "pipeline-clean", sae_refs=[])           # kept features per task
    src = resolve_features(store, "5:12,5:40", sae_refs=["pipeline-sae"])  # the same ids for every task
    src.sets  # set name (a task, or "given") -> dictionary key -> feature ids

Steer artifacts are read by their fixed layout (``steer.h5``: attrs mode/layer, ``tasks``,
``selected/<task>``, ``kept/<task>``), clean artifacts by ``clean.read_h5``. Dictionaries come
from the artifact's ``sae`` input; the model, the task split and prompt settings from the collect
artifact found by following inputs (steer → clean → collect).
"""

from __future__ import annotations


import re
from dataclasses import dataclass, field, replace
from typing import Sequence

from icl_cli.core.errors import IclError

GIVEN = "given"
_IDS_RE = re.compile(r"^\s*(\d+\s*:\s*)?\d+(\s*,\s*(\d+\s*:\s*)?\d+)*\s*,?\s*$")


@dataclass
class SteerSets:
    mode: str
    layer: int
    tasks: list[str]
    selected: dict[str, list[int]]
    kept: dict[str, list[int]]
    model: str | None = None


@dataclass
class Source:
    kind: str  # steer | clean | given
    sets: dict[str, dict[str, list[int]]]
    saes: dict[str, object]  # dictionary key -> Dictionary
    sae_arts: dict[str, object] = field(default_factory=dict)  # dictionary key -> Artifact | None
    artifact: object = None  # the steer / clean artifact
    collect: object = None  # the collect artifact behind it
    mode: str | None = None  # a steer artifact's mode

    @property
    def what(self) -> str:
        if self.kind == "steer":
            return {"executor": "executors", "detector": "detectors"}.get(self.mode or "", "selected features")
        return {"clean": "kept features", "given": "given features"}[self.kind]


def read_steer(path) -> SteerSets:
    """The parts of a steer artifact (layout in docs/COMMON contracts) that ablate needs."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            dec = lambda x: x.decode() if isinstance(x, bytes) else str(x)  # noqa: E731
            grp = lambda name: {t: [int(v) for v in g[()]] for t, g in f[name].items()} if name in f else {}  # noqa: E731
            return SteerSets(dec(f.attrs["mode"]), int(f.attrs["layer"]), [dec(t) for t in f["tasks"][()]],
                             grp("selected"), grp("kept"), dec(f.attrs["model"]) if "model" in f.attrs else None)
    except (OSError, KeyError) as exc:
        raise IclError(f"{path} is not a readable steer artifact ({exc}); run `icl store verify`") from None


def find_collect(store, art):
    """The collect artifact ``art`` was made from (following its inputs), or None."""
    seen, todo = set(), [art]
    while todo:
        a = todo.pop(0)
        if a is None or a.key in seen:
            continue
        seen.add(a.key)
        if a.step == "collect":
            return a
        todo += [store.get(k) for k in a.inputs.values()]
    return None


def load_sae(store, ref: str):
    """(key, Dictionary, Artifact | None) for a store reference, an SAELens folder or a release id."""
    from icl_cli.dictionaries.io import load_dictionary

    try:
        art = store.resolve(ref)
    except IclError:
        art = None
    if art is not None and art.step in ("collect", "clean", "steer", "ablate", "circuit"):
        raise IclError(f"{ref} is a {art.step} artifact, not an SAE; pass a train-sae or imported SAE")
    d = load_dictionary(art if art is not None else ref, store)
    return (art.key if art is not None else ref), d, art


def _input_sae(store, art):
    key = art.inputs.get("sae")
    if key:
        return load_sae(store, key)
    ref = art.params.get("sae")
    if ref:
        return load_sae(store, ref)
    raise IclError(f"{art.step} artifact {art.key[:12]} names no SAE; pass the features as LAYER:ID with --sae")


def _at_layer(d, layer):
    """The dictionary, told the layer its artifact used when its own files do not record one
    (the authors' Gemma-1 SAEs are imported without a layer and cleaned with ``--layer``)."""
    if d.cfg.layer is None and layer is not None:
        d.cfg = replace(d.cfg, layer=int(layer))
    return d


def _check_ids(sets: dict, saes: dict) -> None:
    for name, by_key in sets.items():
        for key, ids in by_key.items():
            width = saes[key].cfg.d_sae
            bad = [f for f in ids if not 0 <= f < width]
            if bad:
                raise IclError(f"feature(s) {bad} of set {name} are beyond the SAE's width {width}; use ids 0-{width - 1}")


def parse_ids(text: str, saes: dict) -> dict[str, list[int]]:
    """``"5:12,5:40"`` (or ``"12,40"`` with one SAE) -> dictionary key -> ids, matched by layer."""
    by_layer: dict[int, list[str]] = {}
    for key, d in saes.items():
        by_layer.setdefault(d.cfg.layer, []).append(key)
    out: dict[str, list[int]] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        layer, _, fid = item.rpartition(":")
        if not layer:
            if len(saes) != 1:
                raise IclError(f"feature {item!r} has no layer; write LAYER:ID when several SAEs are given")
            key = next(iter(saes))
        else:
            keys = by_layer.get(int(layer), [])
            if len(keys) != 1:
                have = sorted(l for l in by_layer if l is not None)
                raise IclError(f"feature {item}: {'no' if not keys else 'more than one'} --sae is for layer {layer} "
                               f"(the SAEs given are for layers {have}); pass one --sae per layer")
            key = keys[0]
        out.setdefault(key, []).append(int(fid))
    return out


def resolve_features(store, ref: str, sae_refs: Sequence[str] = (), which: str = "selected") -> Source:
    """The feature sets ``ref`` names (see the module docstring). which: selected | kept (steer artifacts)."""
    art = None
    explicit = bool(_IDS_RE.match(ref))
    if not explicit or ":" not in ref:
        try:
            art = store.resolve(ref)
        except IclError:
            if not explicit:
                raise
    if art is None:
        if not sae_refs:
            raise IclError("features given as ids need their SAE: pass --sae REF (one per layer)")
        loaded = [load_sae(store, r) for r in sae_refs]
        saes = {k: d for k, d, _ in loaded}
        sets = {GIVEN: parse_ids(ref, saes)}
        _check_ids(sets, saes)
        arts = {k: a for k, _, a in loaded}
        collect = next((find_collect(store, a) for a in arts.values() if a is not None and find_collect(store, a)), None)
        return Source("given", sets, saes, arts, None, collect)
    if art.step == "steer":
        st = read_steer(art.file("steer.h5"))
        if which == "selected" and st.mode not in ("executor", "detector"):
            raise IclError(f"steer artifact {art.key[:12]} is a {st.mode} sweep and selects no features; "
                           "use an executor or detector steer artifact, or --set kept")
        chosen = st.selected if which == "selected" else st.kept
        key, d, sae_art = _input_sae(store, art)
        if d.cfg.layer is not None and d.cfg.layer != st.layer:
            raise IclError(f"steer artifact {art.key[:12]} steered layer {st.layer} but its SAE is for layer {d.cfg.layer}")
        d = _at_layer(d, st.layer)
        sets = {t: {key: chosen.get(t, [])} for t in st.tasks}
        src = Source("steer", sets, {key: d}, {key: sae_art}, art, find_collect(store, art), st.mode)
    elif art.step == "clean":
        from icl_cli.clean.cleaning import read_h5

        _, results = read_h5(art.file("clean.h5"))
        key, d, sae_art = _input_sae(store, art)
        d = _at_layer(d, art.params.get("layer"))
        sets = {t: {key: r.features} for t, r in results.items()}
        src = Source("clean", sets, {key: d}, {key: sae_art}, art, find_collect(store, art))
    else:
        raise IclError(f"artifact {art.key[:12]} is a {art.step} artifact; --features takes a steer or clean "
                       "artifact, or LAYER:ID,... with --sae")
    _check_ids(src.sets, src.saes)
    return src
