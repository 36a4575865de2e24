"""Where and how a model runs: the device and dtype the user named or the best the machine has, and its
evaluation mode for a block of work."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import nn

from .errors import AdaPrunerError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present unless the user names a device; a named but absent device is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AdaPrunerError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AdaPrunerError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AdaPrunerError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return dev


#: Kept MLP channels per layer come in multiples of this on CUDA, where matrix units work in tiles.
CUDA_CHANNEL_MULTIPLE = 64


def default_channel_multiple(device: torch.device) -> int:
    """The step of kept MLP channels where the user names none: :data:`CUDA_CHANNEL_MULTIPLE` on CUDA, 1 elsewhere."""
    return CUDA_CHANNEL_MULTIPLE if device.type == "cuda" else 1


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU, unless the user names one."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise AdaPrunerError(f"unknown dtype {dtype!r} (use {', '.join(sorted(_DTYPES))} or auto)") from None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in evaluation mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def release_memory() -> None:
    """Give freed memory back to the system: Python's cycles collected, glibc's free heap pages returned, CUDA's
    cache emptied. Without the trim, a CPU process keeps the pages of its largest step (LLM-Pruner's float16 backward
    on a 1.5B model: 19 GB) resident for the rest of its life, though torch freed them."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
