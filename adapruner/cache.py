"""Where AdaPruner keeps what it fetches and converts: models, corpora, pool statistics."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ADAPRUNER_CACHE"


def cache_dir(sub: str | None = None) -> Path:
    """The cache root (``$ADAPRUNER_CACHE``, else ``~/.cache/adapruner``), or a folder below it."""
    root = Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "adapruner").expanduser()
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path
