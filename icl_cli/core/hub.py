"""Talking to the Hugging Face Hub without hanging: when it cannot be reached, every download
goes through the local cache only, so a missing file fails at once with one line instead of
minutes of retries."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on port 443 (checked once per process)."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Within the block, HF_HUB_OFFLINE is on when the Hub is unreachable; yields that flag."""
    import huggingface_hub.constants as constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = bool(saved) or not hub_reachable()
    try:
        yield constants.HF_HUB_OFFLINE
    finally:
        constants.HF_HUB_OFFLINE = saved
