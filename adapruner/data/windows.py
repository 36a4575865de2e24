"""Token windows: what the model actually sees, for evaluation and for calibration.

Both follow the standard perplexity recipe: a part's documents are joined with ``"\\n\\n"``,
tokenised once, and cut into non-overlapping windows of ``seq_len`` tokens (the last, partial
window is dropped).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import AdaPrunerError

if TYPE_CHECKING:
    from .sources import TextSource



DEFAULT_SEQ_LEN = 128  # tokens per calibration and evaluation window

def tokenize_windows(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """``[n, seq_len]`` token ids of consecutive windows of the joined ``texts``."""
    if seq_len < 2:
        raise AdaPrunerError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise AdaPrunerError(f"text too short: {ids.numel()} tokens make no window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len).clone()


def eval_windows(
    tokenizer: PreTrainedTokenizerBase,
    source: TextSource,
    split: str,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Evaluation windows of one part (``validation`` or ``test``) of a source."""
    return tokenize_windows(tokenizer, source.part(split), seq_len, max_windows)


@dataclass(frozen=True)
class CalibrationPool:
    """The candidate calibration samples a search chooses from: ``N`` windows of ``seq_len`` tokens.

    ``source_of[i]`` names the text source window ``i`` was drawn from, so a subset can be described
    by its mixture of sources. ``content_hash`` identifies the pool (token ids and sources) and keys
    the cache of per-sample statistics.
    """

    windows: torch.Tensor  # [N, seq_len] int64
    source_of: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.windows.ndim != 2 or len(self.source_of) != self.windows.shape[0]:
            raise ValueError("windows must be [N, seq_len] with one source name per window")

    def __len__(self) -> int:
        return self.windows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    @property
    def content_hash(self) -> str:
        digest = hashlib.sha256(self.windows.cpu().numpy().tobytes())
        digest.update("\0".join(self.source_of).encode())
        return digest.hexdigest()


def training_windows(tokenizer: PreTrainedTokenizerBase, sources: Sequence[TextSource], seq_len: int) -> torch.Tensor:
    """Fine-tuning text: every window of the sources' *pool* parts, never what validation or test read."""
    return torch.cat([tokenize_windows(tokenizer, source.pool, seq_len) for source in sources])


def sample_windows(tokenizer: PreTrainedTokenizerBase, sources: Sequence[TextSource], seq_len: int,
                   per_source: int, seed: int = 0) -> torch.Tensor:
    """Up to ``per_source`` random windows of each source's *pool* part (all of them where it has fewer),
    source after source; seeded, so the same sources and seed give the same windows."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for source in sources:
        windows = tokenize_windows(tokenizer, source.pool, seq_len)
        chunks.append(windows[torch.randperm(windows.shape[0], generator=generator)[:per_source]])
    return torch.cat(chunks)


def parse_draw(spec: str, default_n: int) -> tuple[str, int]:
    """``SOURCE[:N]`` -> (source spec, N); e.g. ``builtin:books:10`` or ``hf:wikitext:raw:32``."""
    head, _, tail = spec.rpartition(":")
    if head and tail.isascii() and tail.isdigit():  # ASCII digits only: "²" and "①" pass isdigit() alone
        if int(tail) < 1:
            raise AdaPrunerError(f"calibration sample count must be positive in {spec!r}")
        return head, int(tail)
    return spec, default_n


def even_counts(n_samples: int, n_sources: int) -> list[int]:
    """Split ``n_samples`` as evenly as possible among ``n_sources`` (earlier sources take the extra)."""
    if n_sources < 1 or n_samples < n_sources:
        raise AdaPrunerError(f"a pool of {n_samples} samples cannot cover {n_sources} sources")
    share, extra = divmod(n_samples, n_sources)
    return [share + (1 if i < extra else 0) for i in range(n_sources)]


def pool_draws(specs: Sequence[str], pool_size: int) -> list[tuple[str, int]]:
    """Each calibration spec with the number of pool windows it gives: its own count (``SOURCE:N``), or
    an even share of what the counted specs leave of ``pool_size``."""
    draws = [parse_draw(spec, 0) for spec in specs]
    unsized = [spec for spec, n in draws if n == 0]
    if unsized:
        shares = dict(zip(unsized, even_counts(pool_size - sum(n for _, n in draws), len(unsized)), strict=True))
        draws = [(spec, n or shares[spec]) for spec, n in draws]
    return draws


def build_pool(
    tokenizer: PreTrainedTokenizerBase,
    draws: Sequence[tuple[TextSource, int]],
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
) -> CalibrationPool:
    """Draw ``n`` random windows from the ``pool`` part of each ``(source, n)`` in ``draws``.

    The draw is seeded, so the same sources and seed give the same pool (and the same content hash).
    """
    if not draws:
        raise AdaPrunerError("the calibration pool needs at least one text source")
    generator = torch.Generator().manual_seed(seed)
    chunks, names = [], []
    for source, want in draws:
        windows = tokenize_windows(tokenizer, source.pool, seq_len)
        if windows.shape[0] < want:
            raise AdaPrunerError(
                f"source {source.name!r} has only {windows.shape[0]} pool windows of {seq_len} tokens, {want} requested"
            )
        pick = torch.randperm(windows.shape[0], generator=generator)[:want]
        chunks.append(windows[pick])
        names += [source.name] * want
    return CalibrationPool(torch.cat(chunks), tuple(names))
