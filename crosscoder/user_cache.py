"""The user's cache folder: ``$CROSSCODER_CACHE``, else ``~/.cache/crosscoder`` (the model organism, compiled CPU
kernels)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "CROSSCODER_CACHE"


def user_cache_root() -> Path:
    """``$CROSSCODER_CACHE``, else ``~/.cache/crosscoder``."""
    chosen = os.environ.get(CACHE_ENV_VAR)
    return Path(chosen) if chosen else Path.home() / ".cache" / "crosscoder"
