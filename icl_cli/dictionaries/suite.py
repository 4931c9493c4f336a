"""Dictionary suites: per layer an SAE on resid_pre, an SAE on attn_out and a transcoder
mlp_in -> mlp_out, addressed by one name (what `icl circuit --saes SUITE` reads, SPEC §7).

    suite = load_suite("toy-icl-suite", store)    # Suite: {("resid", 3): Dictionary, ...}
    suite = load_suite("smollm2-suite", store)    # SmolLM2-135M: resid, attn, transcoder at 19-21
    suite = load_suite("path/to/folder", store)   # a folder of the same layout
    suite = load_suite("my-suite", store)         # a suite imported with `icl store import-suite`
    suite[("attn", 7)]                            # missing: IclError naming what the suite has
    suite.key, suite.member_keys                  # store keys, for the inputs of an artifact

A suite folder holds ``manifest.json`` and one SAELens folder per dictionary:

    manifest.json   {"name", "model", "model_fingerprint", "dtype", "training": {...},
                     "check": {"task", "n_prompts", "n_shot", "seed"},
                     "dictionaries": [{"kind", "layer", "folder", "arch", "d_sae", "l0", "fvu",
                                       "dead_fraction", "ce_clean", "ce_spliced", "ce_zero",
                                       "ce_recovered", "check_fvu", "source_key"}, ...]}
    resid.0/ attn.0/ transcoder.0/ resid.1/ ...   cfg.json, sae_weights.safetensors, sparsity.safetensors

l0, fvu, dead_fraction and ce_* are the held-out metrics of training (float32 weights);
check_fvu is the FVU of the stored weights on the `check` prompts (every token but BOS), which a
test recomputes. With a store, a folder's dictionaries are imported on first use (content-keyed
``import-sae`` artifacts, so importing twice reuses them) and tied together by a ``suite``
artifact whose inputs are those keys: artifacts built from a suite have lineage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from icl_cli.dictionaries.base import Dictionary
from icl_cli.core.errors import IclError

KINDS = ("resid", "attn", "transcoder")
"""resid: SAE on resid_pre[l]; attn: SAE on attn_out[l]; transcoder: mlp_in[l] -> mlp_out[l]."""
KIND_SITE = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "transcoder"}
MANIFEST = "manifest.json"
SUITE_FILE = "suite.json"
"""The suite manifest inside a suite artifact (the store keeps manifest.json for itself)."""
_ZOO = Path(__file__).resolve().parent.parent / "zoo"
BUNDLED = {"toy-icl-suite": _ZOO / "toy-icl-suite", "smollm2-suite": _ZOO / "smollm2-suite"}
"""Suites shipped with icl: the toy model's (every layer) and SmolLM2-135M's (layers 19-21)."""
TRAIN_SCRIPT = {"toy-icl-suite": "scripts/toy_saes.sh", "smollm2-suite": "python -m icl_cli.zoo.smollm2_suite"}
STEP = "suite"
VERSION = 1


class Suite(dict):
    """{(kind, layer): Dictionary}; a missing entry is a one-line IclError, not a KeyError."""

    def __init__(self, name: str, manifest: dict, dicts: dict, key: str | None = None,
                 member_keys: dict | None = None):
        super().__init__(dicts)
        self.name = name
        self.manifest = manifest
        self.key = key
        """The store key of the suite artifact (None when loaded without a store)."""
        self.member_keys: dict[tuple[str, int], str] = member_keys or {}
        """The store key of each dictionary."""

    @property
    def model(self) -> str | None:
        return self.manifest.get("model")

    def layers(self, kind: str) -> list[int]:
        return sorted(layer for k, layer in self if k == kind)

    def __missing__(self, item: Any):
        kind, layer = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
        if kind not in KINDS:
            raise IclError(f"unknown dictionary kind {kind!r}; use one of {', '.join(KINDS)}")
        have = self.layers(kind)
        span = f"layers {_span(have)}" if have else "no layers"
        raise IclError(f"suite {self.name} has no {kind} dictionary at layer {layer} ({kind}: {span}); "
                       f"pass --saes {kind}:{layer}=REF or use a suite that covers it")

    def require(self, layers, kinds=KINDS) -> None:
        """IclError (one line, naming everything missing) unless every (kind, layer) asked for is here."""
        layers = sorted({int(layer) for layer in layers})
        missing = {kind: [layer for layer in layers if (kind, layer) not in self] for kind in kinds}
        missing = {kind: ls for kind, ls in missing.items() if ls}
        if missing:
            what = "; ".join(f"{kind} at layers {_span(ls)} (it has {_span(self.layers(kind)) or 'none'})"
                             for kind, ls in missing.items())
            kind, ls = next(iter(missing.items()))
            raise IclError(f"suite {self.name} lacks {what}; pass --saes {kind}:{ls[0]}=REF for each, "
                           "or choose --layers the suite covers")


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# ---- reading a suite folder --------------------------------------------------------------
def read_manifest(folder: Path) -> dict:
    """The checked manifest of a suite folder."""
    path = folder / MANIFEST
    if not path.is_file():
        raise IclError(f"{folder} is not a dictionary suite: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IclError(f"{path} is not valid JSON ({exc}); fix or replace the file") from None
    entries = manifest.get("dictionaries") if isinstance(manifest, dict) else None
    if not isinstance(entries, list) or not entries:
        raise IclError(f"{path} lists no dictionaries (expected a non-empty 'dictionaries' list)")
    seen = set()
    for e in entries:
        if not isinstance(e, dict) or e.get("kind") not in KINDS or not isinstance(e.get("layer"), int) \
                or not isinstance(e.get("folder"), str):
            raise IclError(f"{path}: entry {e!r} needs kind ({'/'.join(KINDS)}), an integer layer and a folder")
        if (e["kind"], e["layer"]) in seen:
            raise IclError(f"{path} lists {e['kind']} layer {e['layer']} twice")
        seen.add((e["kind"], e["layer"]))
        if not (folder / e["folder"]).is_dir():
            raise IclError(f"suite {folder} lacks the folder {e['folder']} of its {e['kind']} layer {e['layer']} "
                           "dictionary; restore it or remove the entry from the manifest")
    return manifest


def _check(d: Dictionary, kind: str, layer: int, where: str, model: str | None) -> Dictionary:
    c = d.cfg
    if c.site != KIND_SITE[kind] or (c.layer is not None and c.layer != layer):
        raise IclError(f"{where} holds a {c.site} dictionary of layer {c.layer}, but the suite lists it as "
                       f"{kind} layer {layer}; fix the manifest")
    if model and c.model and c.model != model:
        raise IclError(f"{where} was trained on {c.model}, but the suite is for {model}; fix the manifest")
    return d


def _resolve_folder(ref: str) -> Path | None:
    if ref in BUNDLED:
        if not (BUNDLED[ref] / MANIFEST).is_file():
            raise IclError(f"the bundled suite {ref} is missing from this installation ({BUNDLED[ref]}); "
                           f"reinstall icl or train it with {TRAIN_SCRIPT[ref]}")
        return BUNDLED[ref]
    path = Path(ref).expanduser()
    return path.absolute() if path.is_dir() else None


def suite_name(ref: str) -> str:
    """The name a suite folder (or bundled suite) calls itself: its manifest's, else the folder's."""
    folder = _resolve_folder(ref)
    if folder is None:
        raise IclError(f"no suite folder at {ref!r}: give {', '.join(BUNDLED)} or a folder with {MANIFEST}")
    return read_manifest(folder).get("name") or folder.name


# ---- the store ----------------------------------------------------------------------------
def import_suite(store, ref: str, name: str | None = None, log=None, force: bool = False) -> Suite:
    """Import the suite folder `ref` (or a bundled suite's name) into `store`.

    Every dictionary becomes a content-keyed ``import-sae`` artifact and the suite a ``suite``
    artifact whose inputs are their keys. With `name`, the suite artifact is named `name` and
    each dictionary `name.kind.layer`; `force` imports again (replacing damaged imports).
    Returns the loaded Suite.
    """
    from icl_cli.dictionaries.io import load_dictionary
    from icl_cli.store import StepSpec
    from icl_cli.store.imports import import_path

    folder = _resolve_folder(ref)
    if folder is None:
        raise IclError(f"no suite folder at {ref!r}: give {', '.join(BUNDLED)} or a folder with {MANIFEST}")
    manifest = read_manifest(folder)
    suite_name = name or manifest.get("name") or folder.name
    keys, dicts = {}, {}
    for e in manifest["dictionaries"]:
        kind, layer = e["kind"], e["layer"]
        tag = f"{name}.{kind}.{layer}" if name else None
        art = import_path(store, folder / e["folder"], "sae", name=tag, log=log, force=force).artifact
        keys[(kind, layer)] = art.key
        dicts[(kind, layer)] = _check(load_dictionary(art.path), kind, layer, str(folder / e["folder"]),
                                      manifest.get("model"))
    text = (folder / MANIFEST).read_text(encoding="utf-8")
    spec = StepSpec(step=STEP, params={"name": manifest.get("name") or folder.name,
                                       "manifest_sha256": hashlib.sha256(text.encode()).hexdigest()},
                    inputs={f"{k}.{layer}": key for (k, layer), key in keys.items()}, version=VERSION)

    def build(st) -> dict:
        st.write_json(SUITE_FILE, manifest)
        return {"n_dictionaries": len(keys), "model": manifest.get("model")}

    res = store.run(spec, build, name=name, log=log, force=force)
    return Suite(suite_name, manifest, dicts, key=res.artifact.key, member_keys=keys)


def _from_artifact(store, art) -> Suite:
    from icl_cli.dictionaries.io import load_dictionary

    manifest = json.loads(art.file(SUITE_FILE).read_text(encoding="utf-8"))
    keys, dicts = {}, {}
    for label, key in art.inputs.items():
        kind, layer = label.rsplit(".", 1)
        member = store.resolve(key)
        keys[(kind, int(layer))] = member.key
        dicts[(kind, int(layer))] = _check(load_dictionary(member.path), kind, int(layer), f"artifact {key[:12]}",
                                           manifest.get("model"))
    name = (art.names[0] if art.names else None) or manifest.get("name") or art.key[:12]
    return Suite(name, manifest, dicts, key=art.key, member_keys=keys)


def load_suite(ref: str, store=None) -> Suite:
    """The dictionaries of suite `ref`, keyed by (kind, layer).

    ref: a bundled suite ("toy-icl-suite"), a suite folder, or (with a store) the key or name
    of a suite artifact. A folder is imported into `store` on first use; without a store it is
    read in place (and the Suite has no keys).
    """
    from icl_cli.dictionaries.io import load_dictionary

    folder = _resolve_folder(ref)
    if folder is not None:
        if store is not None:
            return import_suite(store, str(folder))
        manifest = read_manifest(folder)
        dicts = {(e["kind"], e["layer"]): _check(load_dictionary(folder / e["folder"]), e["kind"], e["layer"],
                                                 str(folder / e["folder"]), manifest.get("model"))
                 for e in manifest["dictionaries"]}
        return Suite(manifest.get("name") or folder.name, manifest, dicts)
    if store is not None:
        try:
            art = store.resolve(ref)
        except IclError:
            art = None
        if art is not None:
            if art.step != STEP:
                raise IclError(f"{ref} is a {art.step} artifact, not a dictionary suite; pass a suite "
                               f"({', '.join(BUNDLED)}, a suite folder or an imported suite's name)")
            return _from_artifact(store, art)
    raise IclError(f"no dictionary suite {ref!r}: give {', '.join(BUNDLED)}, a folder with {MANIFEST} "
                   "and one SAELens folder per dictionary, or the name of a suite imported with "
                   "`icl store import-suite`")
