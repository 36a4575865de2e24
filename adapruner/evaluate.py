"""Perplexity by the standard recipe: mean token cross-entropy over fixed windows, exponentiated.

Each window is scored on its own (no context carried over), exactly as ``model(ids, labels=ids).loss``
would score it: ``seq_len - 1`` next-token predictions per window, the first token only as context.
Windows can be visited in any order and the per-window losses streamed, so a search can stop a bad
trial after a few windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .device import eval_mode

TOKENS_PER_BATCH = 1024  # an evaluation batch's tokens when none is given: 8 windows of 128


def default_batch_size(seq_len: int) -> int:
    """Windows per evaluation batch when the user gives none: :data:`TOKENS_PER_BATCH` tokens."""
    return max(1, TOKENS_PER_BATCH // seq_len)

@dataclass(frozen=True)
class Perplexity:
    """A perplexity measurement: the mean token cross-entropy over ``windows`` token windows and its exponential."""

    ppl: float
    nll: float  # mean token cross-entropy (nats)
    windows: int
    tokens: int  # tokens predicted: windows * (seq_len - 1)
    seconds: float


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def window_losses(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    order: Sequence[int] | None = None,
) -> Iterator[tuple[int, float]]:
    """Yield ``(window_index, mean_nll)`` for each window, in ``order`` (default: as given)."""
    device = _device_of(model)
    order = list(range(windows.shape[0])) if order is None else [int(i) for i in order]
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids = windows[idx].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            # Same arithmetic as transformers' causal-LM loss: fp32 logits shifted by one and
            # flattened to [tokens, vocab] (a transposed [B, vocab, T] layout is measurably less exact).
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(ids.shape[0], -1).mean(dim=1)
            yield from zip(idx, nll.tolist(), strict=True)


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
) -> Perplexity:
    """Perplexity of ``model`` over ``windows`` (``[n, seq_len]`` token ids)."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError("windows must be a non-empty [n, seq_len >= 2] tensor")
    start = time.perf_counter()
    total, count = 0.0, 0
    bar = tqdm(total=windows.shape[0], desc=desc, unit="win", disable=not progress, leave=False)
    for _, nll in window_losses(model, windows, batch_size):
        total += nll
        count += 1
        bar.update(1)
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}", refresh=False)
    bar.close()
    mean = total / count
    return Perplexity(
        ppl=math.exp(mean),
        nll=mean,
        windows=count,
        tokens=count * (windows.shape[1] - 1),
        seconds=time.perf_counter() - start,
    )
