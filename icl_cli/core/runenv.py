"""The run environment a library step needs: the store, where and how models run, and the channels
for progress lines (library code never prints: it calls ``log`` and ``progress``).

    env = RunEnv(store_path=Path("artifacts"), device="cpu")     # silent: logs and progress dropped
    outcome = run_clean(env, CleanRequest(tv="pipeline-tv", sae="sae-5"))

The command layer builds one from its global options with stderr implementations of ``log`` and
``progress`` (``icl_cli/cli/common.py:run_env``); tests may pass lists' ``append`` to capture them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

Advance = Callable[[str], None]
"""``advance(label)``: one unit of work done (a label starting with "…" only updates the label)."""


def _drop(message: str) -> None:
    pass


@contextlib.contextmanager
def _no_progress(total: int, what: str) -> Iterator[Advance]:
    yield _drop


@dataclass
class RunEnv:
    """Where a step stores its artifacts, where its model runs, and where its progress goes."""

    store_path: Path
    """Root of the artifact store."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | xla."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16."""
    seed: int = 0
    """Seed for every random choice a step makes."""
    device_map: str | None = None
    """Spread a large model over devices with accelerate (e.g. auto)."""
    trust_remote_code: bool = False
    """Allow a model repository's own code to run."""
    verbose: bool = False
    """Leave the model libraries' own progress bars and warnings on."""
    log: Callable[[str], None] = field(default=_drop, repr=False)
    """One progress or info line (the command layer writes it to stderr)."""
    progress: Callable[[int, str], ContextManager[Advance]] = field(default=_no_progress, repr=False)
    """``with env.progress(total, what) as advance:`` progress over ``total`` units of work."""

    @cached_property
    def store(self):
        """The artifact store at ``store_path``."""
        from icl_cli.store import Store

        return Store(self.store_path)

    def load_lm(self, model: str) -> Any:
        """Load ``model`` (preset, HF id or folder) on this environment's device, dtype and device map,
        seeding torch first -> LoadedModel."""
        import torch
        from transformers.utils import logging as hf_logging

        from icl_cli.core.models import load_model

        if not self.verbose:
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        torch.manual_seed(self.seed)
        self.log(f"loading {model}")
        return load_model(model, device=self.device, dtype=self.dtype, device_map=self.device_map,
                          trust_remote_code=self.trust_remote_code, log=self.log)

    def device_dtype(self) -> tuple[str, str]:
        """(str(device), str(dtype)) of a run here: without torch when certainly on the CPU
        (``cpu_device_dtype``), else asking torch (a GPU may be there)."""
        known = self.cpu_device_dtype()
        if known is not None:
            return known
        from icl_cli.core.models import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        return str(device), str(resolve_dtype(self.dtype, device))

    def cpu_device_dtype(self) -> tuple[str, str] | None:
        """("cpu", "torch.<dtype>") when this run is certain to be on the CPU, known without torch;
        None otherwise (see ``core/fastpath.py``)."""
        from icl_cli.core.fastpath import cpu_device_dtype

        return cpu_device_dtype(self.device, self.dtype, self.device_map)

    def saved(self, res) -> None:
        """Say whether the artifact of a StepResult was computed or reused."""
        verb = "reused" if res.reused else "saved"
        self.log(f"{verb} {res.artifact.step} artifact {res.artifact.key[:12]}")
