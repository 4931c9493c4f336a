"""Reading and writing dictionaries: the SAELens folder layout, SAELens releases, the authors' files.

    save_saelens(d, folder, sparsity=None)    folder/cfg.json, sae_weights.safetensors, sparsity.safetensors
    load_dictionary("path/to/folder" | "file.safetensors" | artifact | "release/sae_id")
    import_sae(src, dest) -> params            (for `icl store import --kind sae`)

A folder we write loads with `sae_lens.SAE.load_from_disk`. Our own provenance (model, site,
layer) sits in cfg.json's `metadata` next to SAELens's `model_name`/`hook_name`, so neither
library loses anything. Transcoders: standard → "transcoder", jumprelu → "jumprelu_transcoder";
gated and top-k transcoders keep their architecture with apply_b_dec_to_input = false (SAELens
reads them when d_in = d_out, which holds for mlp_in → mlp_out).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from icl_cli.dictionaries import gated, jumprelu, standard, topk  # noqa: F401  (registers the architectures)
from icl_cli.dictionaries.authors import is_authors_file, read_authors
from icl_cli.dictionaries.base import DictConfig, Dictionary, build
from icl_cli.core.errors import IclError, IntegrityError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAELENS_VERSION = "6.0.0"  # the config schema we write (checked by SAELens's loader)

# SAELens architecture -> (our arch, is a transcoder)
_FROM_SAELENS = {
    "standard": ("standard", False),
    "gated": ("gated", False),
    "topk": ("topk", False),
    "jumprelu": ("jumprelu", False),
    "transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", True),
}

_SAELENS_HOOKS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "transcoder": "ln2.hook_normalized"}


def hook_name(site: str, layer: int | None) -> str:
    """TransformerLens-style hook name SAELens users expect (blocks.12.hook_resid_pre)."""
    return f"blocks.{layer if layer is not None else 0}.{_SAELENS_HOOKS.get(site, site)}"


def _parse_hook(name: str | None) -> tuple[str | None, int | None]:
    m = re.match(r"blocks\.(\d+)\.(.+)$", name or "")
    if not m:
        return None, None
    layer, rest = int(m.group(1)), m.group(2)
    if "resid_pre" in rest:
        return "resid_pre", layer
    if "attn_out" in rest or "hook_z" in rest:
        return "attn_out", layer
    if "mlp_in" in rest or "ln2" in rest or "mlp_out" in rest:
        return "transcoder", layer
    if "resid_post" in rest:  # resid_post[l] = resid_pre[l+1]
        return "resid_pre", layer + 1
    return None, layer


# ---- writing ------------------------------------------------------------------------------
def saelens_cfg(d: Dictionary) -> dict[str, Any]:
    c = d.cfg
    arch = c.arch
    if c.is_transcoder and arch in ("standard", "jumprelu"):
        arch = "transcoder" if arch == "standard" else "jumprelu_transcoder"
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": c.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "model_name": c.model,
            "hook_name": c.hook_name or hook_name(c.site, c.layer),
            "icl": {"arch": c.arch, "site": c.site, "layer": c.layer, "model": c.model,
                    "normalisation": c.normalisation, "extra": c.extra},
        },
    }
    if c.is_transcoder:
        cfg["d_out"] = c.d_out
        cfg["metadata"]["hook_name_out"] = f"blocks.{c.layer}.hook_mlp_out"
    if c.arch == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


def save_saelens(d: Dictionary, folder: Path | str, sparsity: Tensor | None = None, save_file=None) -> Path:
    """Write `d` as a SAELens folder. sparsity: [d_sae] log10 firing frequency.

    save_file(path, tensors, metadata) lets the store add its own safetensors metadata. Identical
    dictionaries give identical files (canonical safetensors headers: store/tensorfile.py).
    """
    from icl_cli.store import tensorfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write = save_file or (lambda name, tensors, metadata=None: tensorfile.save(folder / name, tensors, metadata))
    (folder / CFG_FILE).write_text(json.dumps(saelens_cfg(d), indent=2))
    write(WEIGHTS_FILE, d.saelens_state())
    if sparsity is not None:
        write(SPARSITY_FILE, {"sparsity": sparsity.detach().float().cpu().contiguous()})
    return folder


# ---- reading ------------------------------------------------------------------------------
def check_finite(state: dict[str, Tensor], where: str) -> None:
    """IclError naming the first tensor holding NaN or ±inf (such weights only fail much later)."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            n = int((~torch.isfinite(t)).sum())
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise IclError(f"{where}: tensor {name} holds {n} non-finite value(s) ({kind} at index {bad}); "
                           "the SAE is damaged or diverged in training, so it is not used")


def from_saelens(cfg: dict[str, Any], state: dict[str, Tensor], where: str = "the SAE", **overrides) -> Dictionary:
    """Our dictionary from a SAELens config dict and state dict (weights in model space); ``where``
    names the source in errors."""
    _check_sizes(cfg)
    check_finite(state, where)
    arch_sl = cfg.get("architecture", "standard")
    if arch_sl not in _FROM_SAELENS:
        raise IclError(f"SAELens architecture {arch_sl!r} is not supported; supported: {', '.join(_FROM_SAELENS)}")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise IclError(f"SAEs with normalize_activations={norm!r} are not supported; fold it into the weights first")
    arch, is_tc = _FROM_SAELENS[arch_sl]
    meta = cfg.get("metadata") or {}
    ours = meta.get("icl") or {}
    site, layer = _parse_hook(meta.get("hook_name") or cfg.get("hook_name"))
    if is_tc or "d_out" in cfg and cfg.get("d_out") not in (None, cfg["d_in"]):
        site = "transcoder"
    fields = dict(
        d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]), d_out=int(cfg.get("d_out") or cfg["d_in"]), arch=arch,
        model=ours.get("model", meta.get("model_name") or cfg.get("model_name")),
        site=ours.get("site") or site or "resid_pre",
        layer=ours.get("layer", layer),
        hook_name=meta.get("hook_name") or cfg.get("hook_name"),
        normalisation=ours.get("normalisation", "none"),
        k=int(cfg.get("k") or 0),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        extra=ours.get("extra", {}),
    )
    fields.update(overrides)
    c = DictConfig(**fields)
    c.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", True)) and not c.is_transcoder
    d = build(c)
    state = {k: v.float() for k, v in state.items()}
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # pre·‖W_dec[i]‖ decoded with W_dec[i]/‖W_dec[i]‖: fold the norms into the encoder.
        norms = state["W_dec"].norm(dim=1).clamp_min(1e-8)
        state["W_enc"] = state["W_enc"] * norms
        state["b_enc"] = state["b_enc"] * norms
        state["W_dec"] = state["W_dec"] / norms[:, None]
    d.load_saelens_state(state)
    d.eval()
    return d


def _check_sizes(cfg: Any) -> None:
    """The config fields every SAE needs, as one-line errors (not a KeyError deep inside)."""
    if not isinstance(cfg, dict):
        raise IclError(f"an SAE {CFG_FILE} must hold a JSON object, not {type(cfg).__name__}")
    what = {"d_in": "the input width, the model's d_model", "d_sae": "the number of features", "d_out": "the output width"}
    for key in ("d_in", "d_sae") + (("d_out",) if cfg.get("d_out") is not None else ()):
        value = cfg.get(key)
        if value is None:
            raise IclError(f"the SAE's {CFG_FILE} has no {key!r}; add it ({what[key]})")
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) <= 0:
            raise IclError(f"the SAE's {CFG_FILE} has {key}={value!r}; it must be a positive integer")


def read_saelens_folder(folder: Path, **overrides) -> Dictionary:
    from safetensors.torch import load_file

    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.exists() or not w_path.exists():
        raise IclError(f"{folder} is not a SAELens folder (needs {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IclError(f"{cfg_path} is not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise IclError(f"{cfg_path} is not UTF-8 text; it should be a SAELens JSON config") from None
    return from_saelens(cfg, load_file(str(w_path)), where=str(w_path), **overrides)


def read_sparsity(folder: Path) -> Tensor | None:
    from safetensors.torch import load_file

    p = Path(folder) / SPARSITY_FILE
    return load_file(str(p))["sparsity"] if p.exists() else None


def _split_release(spec: str) -> tuple[str, str] | None:
    """'release/sae_id…' -> (release, sae_id) when the release is in SAELens's directory."""
    if "/" not in spec or spec.startswith(("/", ".", "~")):
        return None
    release, sae_id = spec.split("/", 1)
    return (release, sae_id) if release in _saelens_releases() else None


def _saelens_releases() -> set[str]:
    """Release names from SAELens's pretrained_saes.yaml, read without importing sae_lens (slow)."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("sae_lens")
    if spec is None or spec.origin is None:
        return set()
    path = Path(spec.origin).parent / "pretrained_saes.yaml"
    if not path.exists():
        return set()
    return set(yaml.safe_load(path.read_text()) or {})


def load_pretrained(release: str, sae_id: str) -> Dictionary:
    """A SAELens pretrained release (e.g. Gemma Scope), downloaded through sae_lens.

    Without network the Hugging Face cache is used; if the SAE is not cached this fails at once
    with one line instead of retrying for a minute.
    """
    from sae_lens import SAE

    from icl_cli.core.hub import offline_unless_reachable

    offline = True
    try:
        with offline_unless_reachable() as offline:
            sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown id: one line for the user
        if offline:
            raise IclError(f"cannot fetch SAE {release}/{sae_id}: no network and it is not in the Hugging Face cache; "
                           "connect (set HF_TOKEN for gated repos) or pass a local SAELens folder") from None
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise IclError(f"could not fetch SAE {release}/{sae_id} ({type(exc).__name__}: {msg}); "
                       "check the id, the network and HF_TOKEN, or pass a local SAELens folder") from None
    cfg = sae.cfg.to_dict()
    fields = {"extra": {"format": "saelens-release", "release": release, "sae_id": sae_id}}
    return from_saelens(cfg, sae.state_dict(), **fields)


def load_dictionary(src: Any, store: Any = None) -> Dictionary:
    """A dictionary from a SAELens folder, an authors' file, a store artifact, or 'release/sae_id'.

    `store` (an icl Store), when given, also resolves artifact keys and names.
    """
    if hasattr(src, "path") and hasattr(src, "key"):  # a store Artifact
        return load_dictionary(Path(src.path))
    path = Path(src)
    if path.is_dir():
        if (path / CFG_FILE).exists():
            return read_saelens_folder(path)
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return _read_file(files[0])
        raise IclError(f"{path} holds no SAE: expected {CFG_FILE} + {WEIGHTS_FILE}, or one authors' .safetensors file")
    if path.is_file():
        return _read_file(path)
    if store is not None:
        try:
            return load_dictionary(store.resolve(str(src)))
        except IntegrityError:
            raise  # a damaged artifact is not "no such SAE"
        except IclError:
            pass
    split = _split_release(str(src))
    if split:
        return load_pretrained(*split)
    raise IclError(f"no SAE at {src!r}: give a SAELens folder, an authors' .safetensors file, an artifact key, "
                   "or a SAELens release like gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")


def _read_file(path: Path) -> Dictionary:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise IclError(f"{path}: expected a .safetensors file")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    if is_authors_file(keys):
        return read_authors(path)
    if path.name == WEIGHTS_FILE and (path.parent / CFG_FILE).exists():
        return read_saelens_folder(path.parent)
    raise IclError(f"{path}: not an authors' SAE file (needs W_enc, b_enc, W_dec, b_dec, s_gate, b_gate, "
                   "scaling_factor, mean_norm) and no cfg.json beside it")


def import_sae(src: Path | str, dest: Path, sparsity: bool = True) -> dict[str, Any]:
    """Write the SAE at `src` (any readable form) into `dest` as a SAELens folder; return its params."""
    d = load_dictionary(src)
    check_finite(d.saelens_state(), str(src))  # authors' files too (read without from_saelens)
    sp = None
    p = Path(src)
    if p.is_dir() and (p / SPARSITY_FILE).exists() and sparsity:
        sp = read_sparsity(p)
    save_saelens(d, dest, sparsity=sp)
    c = d.cfg
    return {"model": c.model, "site": c.site, "layer": c.layer, "arch": c.arch, "d_in": c.d_in,
            "d_sae": c.d_sae, "d_out": c.d_out, "k": c.k or None, "source": str(src),
            "format": c.extra.get("format", "saelens")}

