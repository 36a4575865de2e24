"""What a model costs to run, measured rather than counted: prefill and decode throughput, and peak memory.

A pruned model has fewer parameters on paper; this says whether it is also faster and leaner on the
device and dtype it sits on. Every model is fed the same seeded random token ids, so models measured
one after the other are compared on the same input.

- prefill: tokens/s of one forward pass without the KV cache over a batch of ``b`` sequences of ``t``
  tokens, reported per shape under the key ``"bxt"``. Only the last position's logits are computed,
  as a server does before decoding: pruning leaves the output layer whole, and logits at every
  position would hide what it saves behind a cost no server pays;
- decode: tokens/s of greedy generation at batch 1 with the KV cache. The loop is written out rather
  than left to ``generate`` so that no generation config or end-of-sequence token can stop it early,
  and only the steps after the prompt's forward pass are timed;
- peak memory, over the timed runs (after every warmup run): on CUDA, the allocator's peak
  (``torch.cuda.max_memory_allocated``), weights included; on CPU under Linux, the weights' bytes plus
  how far the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) rose
  above its resident set at the start (activations, KV cache, allocator slack), with memory that
  malloc kept from earlier work handed back first. Where ``/proc`` cannot be read or reset (not
  Linux), it is the weights' bytes alone.

Times are medians over ``repeats`` runs, all taken after ``warmup`` runs of every measurement (a warm-up
decodes at most ``WARMUP_DECODE_TOKENS``: it pages in the cached step, it measures nothing); on
CUDA the device is synchronised before each clock reading. The model stays on its device and dtype,
and torch's thread count is left as it is (and recorded).
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .device import eval_mode
from .errors import AdaPrunerError
from .models import checkpoint_folder, load_model


@dataclass(frozen=True)
class InferenceCost:
    """Speed and memory of one model on one device: prefill and decode throughput, weights, disk, peak memory."""

    device: str
    dtype: str
    threads: int
    parameters: int  # tied weights once
    weight_bytes: int
    disk_bytes: int | None  # the checkpoint's *.safetensors, when measured from a folder
    prefill_tokens_per_s: dict[str, float]  # {"1x512": ..., "8x128": ...}
    decode_tokens_per_s: float
    peak_memory_bytes: int
    # over interleaved rounds (:func:`measure_interleaved`): the figures above are medians, these their ranges
    decode_range: tuple[float, float] | None = None
    prefill_range: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> InferenceCost:
        ranges = {shape: tuple(r) for shape, r in d.get("prefill_range", {}).items()}
        decode = tuple(d["decode_range"]) if d.get("decode_range") else None
        return cls(**{**d, "prefill_tokens_per_s": dict(d["prefill_tokens_per_s"]), "prefill_range": ranges,
                      "decode_range": decode})


WARMUP_DECODE_TOKENS = 16  # a warm-up's decode: the cached step's kernels and buffers, not the rate


def measure_cost(
    model: torch.nn.Module,
    *,
    prefill_shapes: tuple[tuple[int, int], ...] = ((1, 512), (8, 128)),
    new_tokens: int = 128,
    prompt_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    folder: str | Path | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> InferenceCost:
    """Measure ``model`` where it is; ``folder`` (its checkpoint) only supplies ``disk_bytes``."""
    if new_tokens < 2 or prompt_tokens < 1 or repeats < 1 or warmup < 0:
        raise AdaPrunerError(f"measure_cost needs new_tokens >= 2, prompt_tokens >= 1, repeats >= 1 and "
                             f"warmup >= 0, got {new_tokens}, {prompt_tokens}, {repeats}, {warmup}")
    params = list(model.parameters())
    device, dtype, config = params[0].device, params[0].dtype, model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    vocab_size = vocab_size or config.vocab_size
    max_positions = getattr(config, "max_position_embeddings", None) or 1 << 30
    if prompt_tokens + new_tokens - 1 > max_positions:  # the last new token is never fed back
        raise AdaPrunerError(f"a {prompt_tokens}-token prompt and {new_tokens} new tokens exceed the model's "
                             f"{max_positions} positions")

    def random_ids(batch: int, length: int) -> torch.Tensor:
        # seeded per shape: every model measured sees the same ids
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (batch, length), generator=generator).to(device)

    prefill_ids = {f"{b}x{min(t, max_positions)}": random_ids(b, min(t, max_positions)) for b, t in prefill_shapes}
    prompt = random_ids(1, prompt_tokens)
    with eval_mode(model):
        with torch.inference_mode():
            # all warmup first, outside the memory window: a process's first passes also page in kernels
            # and grow pools once, which would be charged to whichever model happens to come first
            for _ in range(warmup):
                for ids in prefill_ids.values():
                    _prefill_seconds(model, ids)
                _decode_seconds(model, prompt, min(new_tokens, WARMUP_DECODE_TOKENS))
            memory = PeakMemory(device)
            prefill = {shape: ids.numel() / _median(partial(_prefill_seconds, model, ids), repeats)
                       for shape, ids in prefill_ids.items()}
            decode_seconds = _median(partial(_decode_seconds, model, prompt, new_tokens), repeats)
            peak = memory.peak_bytes(weight_bytes)
    return InferenceCost(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        parameters=sum(p.numel() for p in params),
        weight_bytes=weight_bytes,
        disk_bytes=_safetensors_bytes(Path(folder)) if folder is not None else None,
        prefill_tokens_per_s=prefill,
        decode_tokens_per_s=(new_tokens - 1) / decode_seconds,
        peak_memory_bytes=peak,
    )


def load_measured(folder: str | Path, device: str | None = None,
                  dtype: str | None = None) -> tuple[torch.nn.Module, Path | None]:
    """``folder`` (a checkpoint folder, an AdaPruner export, or a built-in name such as ``smollm2-135m``)
    loaded to be measured, and the folder its bytes on disk are counted in."""
    name = str(folder)
    # load_model hands an AdaPruner export (an ``adapruner`` entry in config.json) to export.load_pruned
    model, _ = load_model(name, device=device, dtype=dtype)
    return model, checkpoint_folder(name)


def measure_folder(folder: str | Path, device: str | None = None, dtype: str | None = None, **kw) -> InferenceCost:
    """Load ``folder`` (see :func:`load_measured`) and measure it; ``kw`` goes to :func:`measure_cost`."""
    model, checkpoint = load_measured(folder, device, dtype)
    return measure_cost(model, folder=checkpoint, **kw)


def available_memory(device: torch.device) -> int | None:
    """Bytes the device has free: CUDA's own count, on CPU Linux's ``MemAvailable``; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


#: A ratio whose range over the rounds is wider than this share of its median is labelled noisy, never a result.
NOISY = 0.10


def measure_interleaved(models: Mapping[str, torch.nn.Module], repeats: int = 5, warmup: int = 1,
                        folders: Mapping[str, str | Path | None] | None = None, progress: bool = False,
                        **options) -> tuple[dict[str, InferenceCost], list[dict[str, InferenceCost]]]:
    """Every model measured once per round, ``repeats`` rounds, round-robin (A B C, B C A, C A B, ...), so that
    load on a shared machine, which comes and goes, falls on every model alike. Returns each model's cost
    (medians over the rounds, with their ranges; the peak memory the highest) and the rounds themselves
    (:func:`ratio_spread` pairs the models within a round). ``options`` go to :func:`measure_cost`."""
    folders = folders or {}

    def once(label: str, first: bool) -> InferenceCost:
        return measure_cost(models[label], repeats=1, warmup=warmup if first else 0, folder=folders.get(label),
                            **options)

    return interleave(list(models), once, repeats, progress)


def interleave(labels: list[str], measure_once: Callable[[str, bool], InferenceCost], repeats: int,
               progress: bool = False) -> tuple[dict[str, InferenceCost], list[dict[str, InferenceCost]]]:
    """The round-robin of :func:`measure_interleaved` for any runtime: ``measure_once(label, first_round)``
    measures one model once (warming it up in the first round)."""
    if repeats < 1 or not labels:
        raise AdaPrunerError(f"interleaved measurement needs models and repeats >= 1, got {len(labels)} and {repeats}")
    rounds: list[dict[str, InferenceCost]] = []
    for r in tqdm(range(repeats), desc="inference cost", unit="round", disable=not progress, leave=False):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        rounds.append({label: measure_once(label, r == 0) for label in order})
    return {label: _combined([run[label] for run in rounds]) for label in labels}, rounds


def _combined(runs: list[InferenceCost]) -> InferenceCost:
    decode = [run.decode_tokens_per_s for run in runs]
    prefill = {shape: [run.prefill_tokens_per_s[shape] for run in runs] for shape in runs[0].prefill_tokens_per_s}
    return replace(runs[0], decode_tokens_per_s=statistics.median(decode), decode_range=(min(decode), max(decode)),
                   prefill_tokens_per_s={shape: statistics.median(v) for shape, v in prefill.items()},
                   prefill_range={shape: (min(v), max(v)) for shape, v in prefill.items()},
                   peak_memory_bytes=max(run.peak_memory_bytes for run in runs))


def ratio_spread(rounds: list[dict[str, InferenceCost]], reference: str) -> dict[str, dict[str, dict]]:
    """Each model's decode and prefill throughput as a multiple of ``reference``'s within each round: the
    median, the range, and whether the range is wider than :data:`NOISY` of the median (then it is noise,
    not a result)."""
    spread: dict[str, dict[str, dict]] = {}
    for label in rounds[0]:
        ratios = {"decode": [run[label].decode_tokens_per_s / run[reference].decode_tokens_per_s for run in rounds]}
        for shape in rounds[0][label].prefill_tokens_per_s:
            if shape in rounds[0][reference].prefill_tokens_per_s:
                ratios[f"prefill_{shape}"] = [run[label].prefill_tokens_per_s[shape]
                                              / run[reference].prefill_tokens_per_s[shape] for run in rounds]
        spread[label] = {key: _spread(values) for key, values in ratios.items()}
    return spread


def _spread(values: list[float]) -> dict:
    median = statistics.median(values)
    low, high = min(values), max(values)
    return {"median": median, "low": low, "high": high, "noisy": high - low > NOISY * median}


def ratio_text(ratio: float, spread: dict | None) -> str:
    """A ratio as the report and the console show it: with its range over the rounds, and marked as noise
    when that range is wider than :data:`NOISY` of it (one round, or none: the ratio alone)."""
    if spread is None or spread["low"] == spread["high"]:
        return f"{ratio:.2f}"
    text = f"{spread['median']:.2f} ({spread['low']:.2f}-{spread['high']:.2f})"
    return text + " noisy" if spread["noisy"] else text


def speedups(costs: Mapping[str, InferenceCost], reference: str = "unpruned") -> dict[str, dict[str, float]]:
    """Each model's decode and prefill tokens/s as a multiple of ``reference``'s, and its share of the
    reference's parameters and peak memory."""
    if reference not in costs:
        raise KeyError(f"reference {reference!r} is not among the measured models {list(costs)}")
    base = costs[reference]
    return {name: {
        "decode": cost.decode_tokens_per_s / base.decode_tokens_per_s,
        **{f"prefill_{shape}": rate / base.prefill_tokens_per_s[shape]
           for shape, rate in cost.prefill_tokens_per_s.items() if shape in base.prefill_tokens_per_s},
        "parameters": cost.parameters / base.parameters,
        "peak_memory": cost.peak_memory_bytes / base.peak_memory_bytes,
    } for name, cost in costs.items()}


def _prefill_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    return _timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), ids.device)


def _decode_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds of the ``new_tokens - 1`` cached greedy steps that follow the prompt's forward pass."""
    # transformers 5.x renamed the KV cache's argument and output from past_key_values to cache
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)

    def steps():
        nonlocal out, token
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, use_cache=True, **{name: getattr(out, name)})
            token = out.logits[:, -1:].argmax(-1)

    return _timed(steps, prompt.device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    # CUDA kernels run asynchronously: without a sync the clock would time the launches only
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median(run_once: Callable[[], float], repeats: int) -> float:
    return statistics.median(run_once() for _ in range(repeats))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _safetensors_bytes(folder: Path) -> int | None:
    shards = list(folder.glob("*.safetensors"))
    return sum(shard.stat().st_size for shard in shards) if shards else None


class PeakMemory:
    """Peak memory from construction to :meth:`peak_bytes` (see the module's docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_before = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.allocated_before = torch.cuda.memory_allocated(device)
            return
        # memory freed earlier (a model measured before) but kept by malloc would be reused unseen by
        # the resident set: hand it back first, so every model's growth is counted from the same start
        gc.collect()
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (AttributeError, OSError):
            pass  # not glibc
        try:
            # "5" resets VmHWM to the current RSS, so an earlier peak (the model's load) is not counted
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.rss_before = _proc_status_bytes("VmRSS")
        except (OSError, ValueError):
            pass  # not Linux, or /proc is closed to us: the weights alone are reported

    def peak_bytes(self, weight_bytes: int) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)  # the weights are among the allocations
        # the weights were resident before the reset: what rose above that is the measurements' own
        return weight_bytes + (self.growth_bytes() or 0)

    def growth_bytes(self) -> int | None:
        """How far memory rose above where it stood at construction; None where that cannot be read."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.allocated_before
        if self.rss_before is None:
            return None
        return max(0, _proc_status_bytes("VmHWM") - self.rss_before)


def _proc_status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{field} not in /proc/self/status")
    return int(match.group(1)) * 1024
