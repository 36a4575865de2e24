"""Where AdaPruner keeps what it fetches and converts: models, corpora, pool statistics."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ENV_VAR = "ADAPRUNER_CACHE"


def cache_dir(sub: str | None = None) -> Path:
    """The cache root (``$ADAPRUNER_CACHE``, else ``~/.cache/adapruner``), or a folder below it."""
    root = Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "adapruner").expanduser()
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` only when the block succeeds,
    so a concurrent reader (another worker) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A folder of this process's own beside ``path`` to fill; renamed onto ``path`` only when the block succeeds.
    Where another process (a second worker on a fresh machine) published ``path`` first, ours is discarded: both
    built the same thing, and a reader of ``path`` never sees a folder being filled or replaced."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    shutil.rmtree(partial, ignore_errors=True)  # this process's own, interrupted
    partial.mkdir(parents=True)
    try:
        yield partial
        try:
            partial.rename(path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` file written atomically (:func:`atomic_path`)."""
    with atomic_path(path) as partial:
        save_file(tensors, partial, metadata=metadata)


def save_layer_tensors(tensors: dict[tuple[int, str], torch.Tensor], path: str | Path) -> None:
    """Tensors keyed by ``(layer, name)`` (per-layer Grams, unit scores), written atomically."""
    save_tensors({f"{layer}.{name}": t.contiguous() for (layer, name), t in tensors.items()}, path)


def load_layer_tensors(path: str | Path) -> dict[tuple[int, str], torch.Tensor]:
    """What :func:`save_layer_tensors` wrote, keyed by ``(layer, name)`` again."""
    return {(int(layer), name): t for key, t in load_file(str(path)).items() for layer, name in [key.split(".", 1)]}
