"""The dictionaries of a circuit: a suite plus per-site overrides, checked against the model.

    dicts, inputs = resolve_dicts(store, ["toy-icl-suite", "resid:3=my-sae"], layers, "toy-icl", 128, fp)
    dicts = dicts_from_inputs(store, inputs)      # again, from a circuit artifact's inputs

1. ``--saes`` values: one suite reference (bundled name, folder, or imported suite) and any number
   of ``kind:L=REF`` overrides (REF: an artifact, SAELens folder or file).
2. Every (kind, layer) for kind in resid, attn, transcoder and the chosen layers must be present.
3. Each dictionary must fit the model: d_in (and d_out) = d_model, the site and layer it says,
   the model name and weights fingerprint it records (when it records them).
"""

from __future__ import annotations

from pathlib import Path

from icl_cli.circuit.graph import NODE_SITES
from icl_cli.circuit.splice import Key
from icl_cli.core.errors import IclError

KIND_SITE = {"resid": "resid_pre", "attn": "attn_out", "transcoder": "transcoder"}


def parse_specs(specs: list[str]) -> tuple[str | None, dict[Key, str]]:
    """(suite reference or None, {(kind, layer): REF}) from the --saes values."""
    suite, overrides = None, {}
    for spec in specs:
        head, eq, ref = spec.partition("=")
        kind, colon, layer = head.partition(":")
        if eq and colon and kind in NODE_SITES:
            if not layer.strip().isdigit() or not ref.strip():
                raise IclError(f"cannot read --saes {spec!r}; write KIND:LAYER=REF, e.g. resid:3=my-sae")
            overrides[(kind, int(layer))] = ref.strip()
        elif eq or colon and kind in NODE_SITES:
            raise IclError(f"cannot read --saes {spec!r}; write KIND:LAYER=REF with KIND in {', '.join(NODE_SITES)}")
        elif suite is not None:
            raise IclError(f"two suites given ({suite}, {spec}); pass one suite and KIND:LAYER=REF overrides")
        else:
            suite = spec.strip()
    if suite is None and not overrides:
        raise IclError("no dictionaries: pass --saes SUITE (e.g. toy-icl-suite) and/or --saes KIND:LAYER=REF")
    return suite, overrides


def _load_one(store, ref: str):
    """(Dictionary, store key) of an artifact, folder or file."""
    from icl_cli.dictionaries.io import load_dictionary

    art = store.find(ref)
    if art is None and Path(ref).exists():
        art = store.import_path(ref, "sae").artifact
    if art is None:
        raise IclError(f"no dictionary {ref!r}: give a store artifact, a SAELens folder or a dictionary file")
    return load_dictionary(art, store), art.key


def check_dict(d, key: Key, model: str, d_model: int, fingerprint: str | None) -> None:
    """Step 3 for one dictionary."""
    from icl_cli.core.models import same_model

    c, (kind, layer) = d.cfg, key
    if c.d_in != d_model or c.d_out != d_model:
        raise IclError(f"the {kind} dictionary of layer {layer} reads {c.d_in} and writes {c.d_out} dimensions, "
                       f"but the model has d_model {d_model}: it belongs to another model")
    if c.site != KIND_SITE[kind] or (c.layer is not None and c.layer != layer):
        raise IclError(f"the dictionary given as {kind}:{layer} is a {c.site} dictionary of layer {c.layer}")
    if c.model and not same_model(c.model, model):
        raise IclError(f"the {kind} dictionary of layer {layer} was trained on {c.model}, not {model}; "
                       "use dictionaries of this model")
    trained_on = (c.extra or {}).get("model_fingerprint")
    if trained_on and fingerprint and trained_on != fingerprint:
        raise IclError(f"the {kind} dictionary of layer {layer} was trained on other weights of {model}; "
                       "retrain it or use the model it was trained on")


def resolve_dicts(store, specs: list[str], layers: list[int], model: str, d_model: int,
                  fingerprint: str | None) -> tuple[dict[Key, object], dict[str, str]]:
    """Steps 1-3: ({(kind, layer): Dictionary}, {"kind.layer": store key, "suite": key})."""
    from icl_cli.dictionaries.suite import load_suite

    suite_ref, overrides = parse_specs(specs)
    dicts, inputs = {}, {}
    suite = None
    if suite_ref is not None:
        suite = load_suite(suite_ref, store)
        if suite.key:
            inputs["suite"] = suite.key
    for key, ref in overrides.items():
        dicts[key], inputs[f"{key[0]}.{key[1]}"] = _load_one(store, ref)
    need = [(k, l) for l in layers for k in NODE_SITES]
    missing = [k for k in need if k not in dicts and (suite is None or k not in suite)]
    if missing and suite is not None:
        suite.require(sorted({l for _, l in missing}), sorted({k for k, _ in missing}, key=NODE_SITES.index))
    if missing:
        kind, layer = missing[0]
        raise IclError(f"no {kind} dictionary for layer {layer} ({len(missing)} missing); pass --saes SUITE "
                       f"or --saes {kind}:{layer}=REF, or choose --layers")
    for k in need:
        if k not in dicts:
            dicts[k] = suite[k]
            if suite.member_keys.get(k):
                inputs[f"{k[0]}.{k[1]}"] = suite.member_keys[k]
        check_dict(dicts[k], k, model, d_model, fingerprint)
    return {k: dicts[k] for k in need}, inputs


def dicts_from_inputs(store, inputs: dict[str, str], layers: list[int]) -> dict[Key, object]:
    """The dictionaries a circuit artifact was built with (its ``kind.layer`` inputs)."""
    from icl_cli.dictionaries.io import load_dictionary

    out = {}
    for l in layers:
        for kind in NODE_SITES:
            key = inputs.get(f"{kind}.{l}")
            if key is None:
                raise IclError(f"the circuit artifact does not record its {kind} dictionary of layer {l}; re-run icl circuit")
            out[(kind, l)] = load_dictionary(store.resolve(key), store)
    return out
