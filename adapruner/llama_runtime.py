"""A GGUF file run in llama.cpp (through llama-cpp-python): its logits, its perplexity on our windows, its greedy
text and its speed, so that an export is checked and measured where it is deployed.

Perplexity is scored as :mod:`adapruner.evaluate` scores it: each window on its own, from a fresh context, fed as
token ids (no tokenizer and no BOS in between), ``seq_len - 1`` next-token predictions per window.

Speed, as :mod:`adapruner.inference_cost` measures a transformers model: prefill is the tokens/s of one
evaluation of a prompt from an empty context, decode the tokens/s of greedy generation one token at a time
after it, on the same seeded random prompt for every model, on llama.cpp's threads (the machine's cores
unless ``threads`` says otherwise).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .evaluate import Perplexity
from .inference_cost import InferenceCost, interleave
from .to_gguf import FILE_TYPES, llama_cpp_module


def default_threads() -> int:
    """llama.cpp's threads: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (Linux's ``/proc/cpuinfo`` flags; False where they cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_int8" in flags or "amx_tile" in flags


def extra_buffers_default() -> bool:
    """Whether llama.cpp may hold weights in its extra CPU buffer types (repacked layouts, AMX tiles).

    Off on CPUs with AMX: there llama-cpp-python 0.3.36 (llama.cpp 0c1e570), built natively, crashes (segmentation
    fault) in its first evaluation of a quantized file (q8_0, q4_k_m: SmolLM2-135M unpruned as well as the tests'
    tiny models; f32/f16/bf16 run), and runs them without. ``ADAPRUNER_LLAMA_EXTRA_BUFFERS=1`` (or ``0``) decides."""
    chosen = os.environ.get("ADAPRUNER_LLAMA_EXTRA_BUFFERS")
    return chosen.strip() not in ("0", "false", "no", "off") if chosen else not cpu_has_amx()


@contextmanager
def model_params(llama_cpp, extra_buffers: bool):
    """``llama_cpp.Llama`` takes its model parameters from ``llama_model_default_params()`` and offers no argument
    for ``use_extra_bufts``: while this is open, those defaults carry ``extra_buffers``."""
    low = llama_cpp.llama_cpp
    defaults = low.llama_model_default_params

    def params():
        chosen = defaults()
        chosen.use_extra_bufts = extra_buffers
        return chosen

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = defaults


def load_gguf(path: str | Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True,
              extra_buffers: bool | None = None):
    """A ``llama_cpp.Llama`` for ``path`` with a context of ``n_ctx`` tokens, quiet; ``extra_buffers``: see
    :func:`extra_buffers_default` (None: that)."""
    llama_cpp = llama_cpp_module()
    threads = threads or default_threads()
    with model_params(llama_cpp, extra_buffers_default() if extra_buffers is None else extra_buffers):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               logits_all=logits_all, n_threads=threads, n_threads_batch=threads, verbose=False)


def sequence_logits(llm, ids: Sequence[int]) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` (float32) of every position of ``ids``, from an empty context."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def gguf_perplexity(path: str | Path, windows: torch.Tensor, threads: int | None = None) -> Perplexity:
    """Perplexity of the GGUF file ``path`` in llama.cpp over ``windows`` (``[N, seq_len]`` token ids)."""
    llm = load_gguf(path, n_ctx=windows.shape[1], threads=threads)
    start, total = time.perf_counter(), 0.0
    try:
        for window in windows.tolist():
            logits = sequence_logits(llm, window)[:-1].astype(np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            total += float((log_norm - logits[np.arange(len(window) - 1), window[1:]]).sum())
    finally:
        llm.close()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return Perplexity(math.exp(total / tokens), total / tokens, windows.shape[0], tokens, time.perf_counter() - start)


def last_logits(llm) -> np.ndarray:
    """The logits after the last evaluated token (whether or not the context keeps every position's)."""
    llama_cpp = llama_cpp_module()
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def greedy(llm, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy continuation tokens of ``prompt`` (no end-of-sequence stop)."""
    llm.reset()
    llm.eval(list(prompt))
    out = []
    for _ in range(new_tokens):
        out.append(int(np.argmax(last_logits(llm))))
        llm.eval(out[-1:])
    return out


def measure_gguf(llm, path: str | Path, prompt_tokens: int = 128, new_tokens: int = 32, seed: int = 0
                 ) -> InferenceCost:
    """Prefill and decode tokens/s of one loaded GGUF model (one run each: its context must be created with
    ``logits_all=False``, so that the prompt's pass computes the last position's logits only, as a server's
    does), its file's size, and its memory: llama.cpp's model buffers and the context's state."""
    llama_cpp = llama_cpp_module()
    prompt = torch.randint(0, llm.n_vocab(), (prompt_tokens,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = prompt_tokens / (time.perf_counter() - start)
    token = int(np.argmax(last_logits(llm)))
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(np.argmax(last_logits(llm)))
    decode = new_tokens / (time.perf_counter() - start)
    size = Path(path).stat().st_size
    weights = int(llama_cpp.llama_model_size(llm.model))
    return InferenceCost(device="cpu (llama.cpp)", dtype=gguf_type(llm), threads=llm.context_params.n_threads,
                         parameters=int(llama_cpp.llama_model_n_params(llm.model)), weight_bytes=weights,
                         disk_bytes=size, prefill_tokens_per_s={f"1x{prompt_tokens}": prefill},
                         decode_tokens_per_s=decode,
                         peak_memory_bytes=weights + int(llama_cpp.llama_state_get_size(llm.ctx)))


def measure_gguf_interleaved(paths: Mapping[str, str | Path], repeats: int = 5, prompt_tokens: int = 128,
                             new_tokens: int = 32, threads: int | None = None, progress: bool = False
                             ) -> tuple[dict[str, InferenceCost], list[dict[str, InferenceCost]]]:
    """Every GGUF file measured once per round, round-robin (:func:`~adapruner.inference_cost.interleave`), all
    loaded at once; medians and ranges over the rounds, and the rounds for
    :func:`~adapruner.inference_cost.ratio_spread`."""
    llms = {label: load_gguf(path, n_ctx=prompt_tokens + new_tokens + 1, threads=threads, logits_all=False)
            for label, path in paths.items()}

    def once(label: str, first: bool) -> InferenceCost:
        if first:  # warm-up: pages of the file in, buffers allocated
            measure_gguf(llms[label], paths[label], prompt_tokens, 2)
        return measure_gguf(llms[label], paths[label], prompt_tokens, new_tokens)

    try:
        return interleave(list(paths), once, repeats, progress)
    finally:
        for llm in llms.values():
            llm.close()


def gguf_type(llm) -> str:
    """The file's weight type as its ``general.file_type`` names it, e.g. ``q4_k_m``."""
    names = {code: name for name, code in FILE_TYPES.items()}
    file_type = llm.metadata.get("general.file_type")
    return names.get(int(file_type), f"type {file_type}") if file_type is not None else "?"
