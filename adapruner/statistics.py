"""Per-sample statistics of a calibration pool: computed once per job, reused by every trial.

A search trial asks "what would the importance be if only these k pool samples calibrated it?".
Answering with a fresh backward pass per trial would cost minutes; instead one pass over the pool
keeps, for every sample ``n``, what each metric needs, reduced to *units* (the rows of
q/k/v/gate/up_proj and the columns of o_proj/down_proj, i.e. the smallest slices a group is made of):

* ``Σ w·g_n``, ``Σ (w·g_n)²`` and ``Σ |w·g_n|`` over each unit's weights (and bias), where ``g_n`` is
  the gradient of sample ``n``'s LM loss — the first-order (vector-wise, per-sample) and second-order
  (Fisher) Taylor terms;
* ``Σ_t x`` and ``Σ_t x²`` of every input channel of every projection (Wanda-sp norms, FLAP's
  fluctuation);
* ``Σ_t cos(h_in, h_out)`` of every decoder layer (Adapt-Pruner's layer importance);
* the mean final hidden state of each sample (an embedding, to group similar samples).

Every one of these is a sum over samples, so the statistic of any subset is a sum of rows: memory
and time grow with ``N × units``, not ``N × parameters``. LLM-Pruner's element-wise Taylor
``Σ |w · Σ_n g_n|`` is *not* such a sum; :func:`taylor_first_exact` computes it for a given subset.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from .cache import save_tensors
from .device import eval_mode
from .errors import AdaPrunerError, OnStep
from .structure import COLUMN_MODULES, decoder_layers, layer_linears, model_structure

FORMAT_VERSION = 3  # bump when the stored statistics change, so stale cache files are not read (3: bf16 rows)
# The per-unit rows (Taylor terms, activation moments) are stored in bfloat16: half of fp32's bytes, and the
# importance of a subset (its rows summed in fp32) ranks units as fp32 rows do, to a Spearman correlation of
# 0.99999 or more, with 99.8-99.95% of a 20% plan's removed units the same (bench/stats_dtype.py,
# docs/results.md). float16 is no option: its range overflows act_sq and flushes small Taylor terms to zero.
STORED_DTYPE = torch.bfloat16
EXACT_TAYLOR_VERSION = 2  # bump when taylor_first_exact's arithmetic changes (2: float16 products in float32)
# Input activations we track, by the module that reads them (q/k/v share one input, gate/up another).
ACTIVATION_INPUTS = {"q_proj": "attn_in", "o_proj": "o_in", "gate_proj": "mlp_in", "down_proj": "down_in"}
TAYLOR_TERMS = ("wg", "wg2", "wg_abs")  # Σ w·g, Σ (w·g)², Σ |w·g| per unit


def unit_count(linear: nn.Linear, module: str) -> int:
    return linear.in_features if module in COLUMN_MODULES else linear.out_features


def unit_taylor_terms(linear: nn.Linear, module: str) -> torch.Tensor:
    """``[3, units]``: Σ w·g, Σ (w·g)² and Σ |w·g| over each unit of ``linear`` (current ``.grad``)."""
    dim = 0 if module in COLUMN_MODULES else 1
    e = linear.weight.detach().float() * linear.weight.grad.float()
    terms = torch.stack([e.sum(dim), e.square().sum(dim), e.abs().sum(dim)])
    if linear.bias is not None and module not in COLUMN_MODULES and linear.bias.grad is not None:
        eb = linear.bias.detach().float() * linear.bias.grad.float()
        terms += torch.stack([eb, eb.square(), eb.abs()])
    return terms


def check_subset(indices: Sequence[int], pool_size: int) -> torch.Tensor:
    """Indices of a calibration subset as a tensor; out-of-pool, repeated or no indices are errors."""
    idx = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
    if idx.numel() == 0:
        raise AdaPrunerError("a calibration subset needs at least one sample")
    outside = idx[(idx < 0) | (idx >= pool_size)]
    if outside.numel():
        raise AdaPrunerError(f"calibration sample index {int(outside[0])} is outside the pool of {pool_size} samples")
    if idx.unique().numel() != idx.numel():
        raise AdaPrunerError("calibration subset repeats a sample index")
    return idx


@dataclass
class PoolStatistics:
    """Per-sample statistics of ``n_samples`` calibration windows (see the module docstring).

    ``taylor[(layer, module)]`` is ``[N, 3, units]`` (terms in :data:`TAYLOR_TERMS` order);
    ``act_sum`` / ``act_sq`` map ``(layer, input_name)`` to ``[N, channels]``; ``layer_cos`` is
    ``[N, layers]``; ``embedding`` is ``[N, hidden]``; every window has ``tokens`` tokens.

    The per-unit tables hold :data:`STORED_DTYPE` rows (``layer_cos`` and ``embedding``, small, stay fp32);
    :meth:`subset` sums them in fp32. Loaded from a file, every table is memory-mapped (safetensors >= 0.8
    maps the file instead of reading it): a trial reads only its subset's rows, and workers on one machine
    share one copy in the page cache.
    """

    taylor: dict[tuple[int, str], torch.Tensor]
    act_sum: dict[tuple[int, str], torch.Tensor]
    act_sq: dict[tuple[int, str], torch.Tensor]
    layer_cos: torch.Tensor
    embedding: torch.Tensor
    tokens: int
    meta: dict[str, str] = field(default_factory=dict)
    _last: tuple[tuple[int, ...], SubsetStatistics] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_samples(self) -> int:
        return self.layer_cos.shape[0]

    def subset(self, indices: Sequence[int]) -> SubsetStatistics:
        """The statistics of a subset of the pool: sums over its samples. The last subset's sums are kept (a
        trial asks for them twice: its importance, then its allocation's layer similarities); treat them as
        read-only."""
        idx = check_subset(indices, self.n_samples)
        key = tuple(idx.tolist())
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        # rows as stored (possibly 16-bit), summed in fp32
        pick = lambda table: {k: v.index_select(0, idx).sum(0, dtype=torch.float32) for k, v in table.items()}  # noqa: E731
        summed = SubsetStatistics(
            taylor=pick(self.taylor), act_sum=pick(self.act_sum), act_sq=pick(self.act_sq),
            layer_cos=self.layer_cos.index_select(0, idx).sum(0, dtype=torch.float32) / (idx.numel() * self.tokens),
            tokens=idx.numel() * self.tokens,
        )
        self._last = (key, summed)
        return summed

    # -- storage --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        tensors = {"layer_cos": self.layer_cos.contiguous(), "embedding": self.embedding.contiguous()}
        for prefix, table in (("taylor", self.taylor), ("act_sum", self.act_sum), ("act_sq", self.act_sq)):
            tensors |= {f"{prefix}.{layer}.{name}": t.contiguous() for (layer, name), t in table.items()}
        save_tensors(tensors, path, metadata={"tokens": str(self.tokens), "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> PoolStatistics:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata()
        tensors = load_file(str(path))
        tables: dict[str, dict[tuple[int, str], torch.Tensor]] = {"taylor": {}, "act_sum": {}, "act_sq": {}}
        for key, tensor in tensors.items():
            if key not in ("layer_cos", "embedding"):
                prefix, layer, name = key.split(".")
                tables[prefix][(int(layer), name)] = tensor
        return cls(**tables, layer_cos=tensors["layer_cos"], embedding=tensors["embedding"],
                   tokens=int(header["tokens"]),
                   meta=json.loads(header["meta"]))


@dataclass
class SubsetStatistics:
    """Statistics summed over one calibration subset (what a metric consumes)."""

    taylor: dict[tuple[int, str], torch.Tensor]  # [3, units]
    act_sum: dict[tuple[int, str], torch.Tensor]  # [channels]
    act_sq: dict[tuple[int, str], torch.Tensor]  # [channels]
    layer_cos: torch.Tensor  # [layers], mean cosine over the subset's tokens
    tokens: int

    def input_norm(self, layer: int, module: str) -> torch.Tensor:
        """‖X_j‖₂ over the subset's tokens of each input channel of ``module``."""
        return self.act_sq[(layer, ACTIVATION_INPUTS[_input_owner(module)])].sqrt()

    def input_variance(self, layer: int, module: str) -> torch.Tensor:
        key = (layer, ACTIVATION_INPUTS[_input_owner(module)])
        mean = self.act_sum[key] / self.tokens
        return (self.act_sq[key] / self.tokens - mean.square()).clamp_min(0.0)


def _input_owner(module: str) -> str:
    return {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(module, module)


class _ActivationRecorder:
    """Forward hooks that sum each tracked input's moments and each layer's in/out cosine."""

    def __init__(self, model: nn.Module):
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.squares: dict[tuple[int, str], torch.Tensor] = {}
        self.cos: dict[int, torch.Tensor] = {}
        self.embedding: torch.Tensor | None = None
        self.handles = [model.model.norm.register_forward_hook(self._embedding_hook)]
        for i, layer in enumerate(decoder_layers(model)):
            linears = layer_linears(layer)
            for module, name in ACTIVATION_INPUTS.items():
                self.handles.append(linears[module].register_forward_pre_hook(self._input_hook((i, name))))
            self.handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))

    def _input_hook(self, key):
        def hook(_module, args):
            x = args[0].detach().float().flatten(0, -2)
            self.sums[key] = x.sum(0)
            self.squares[key] = x.square().sum(0)

        return hook

    def _layer_hook(self, index):
        def hook(_module, args, kwargs, output):
            h_in = (args[0] if args else kwargs["hidden_states"]).detach().float()
            h_out = (output[0] if isinstance(output, tuple) else output).detach().float()
            self.cos[index] = torch.cosine_similarity(h_in, h_out, dim=-1).sum()

        return hook

    def _embedding_hook(self, _module, _args, output):
        self.embedding = output.detach().float().flatten(0, -2).mean(0)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def input_variances(model: nn.Module, windows: torch.Tensor, modules: Sequence[str] = ("o_proj", "down_proj"),
                    batch_size: int = 8) -> dict[tuple[int, str], torch.Tensor]:
    """The variance of each input column of ``modules`` over ``windows``' tokens, per decoder layer of ``model``
    (its own layers, pruned or not): one forward pass, no gradients, float64 sums."""
    device = next(model.parameters()).device
    sums: dict[tuple[int, str], torch.Tensor] = {}
    squares: dict[tuple[int, str], torch.Tensor] = {}
    tokens = [0]

    def hook(key):
        def record(_module, args):
            x = args[0].detach().flatten(0, -2).double()
            sums[key] = sums.get(key, 0) + x.sum(0)
            squares[key] = squares.get(key, 0) + x.square().sum(0)
        return record

    handles = [layer_linears(layer)[m].register_forward_pre_hook(hook((i, m)))
               for i, layer in enumerate(decoder_layers(model)) for m in modules]
    with eval_mode(model):
        try:
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size]
                tokens[0] += batch.numel()
                model(input_ids=batch.to(device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    n = tokens[0]
    return {key: (squares[key] / n - (sums[key] / n).square()).clamp_min(0.0).float().cpu() for key in sums}


def _grad_only_on_projections(model: nn.Module) -> dict[nn.Parameter, bool]:
    """Gradients for the prunable projections only: embeddings and lm_head need none."""
    before = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in decoder_layers(model):
        for linear in layer_linears(layer).values():
            for p in linear.parameters():
                p.requires_grad_(True)
    return before


def collect_statistics(model: nn.Module, windows: torch.Tensor, progress: bool = True,
                       on_step: OnStep | None = None, dtype: torch.dtype = STORED_DTYPE) -> PoolStatistics:
    """One forward and backward per pool window (``[N, seq_len]``), reduced to per-sample statistics.

    Runs on the model's device with fp32 accumulators and ``use_cache=False``, each sample's per-unit
    rows rounded once to ``dtype`` as they are stored (see :data:`STORED_DTYPE`); the model's weights
    are left untouched and its gradients cleared. ``on_step("pool statistics", done, total)`` is
    called before each sample (and may raise :class:`~adapruner.errors.Stopped`).
    """
    structure = model_structure(model)
    device = next(model.parameters()).device
    n = windows.shape[0]
    taylor = {
        (i, m): torch.zeros(n, 3, unit_count(lin, m), dtype=dtype)
        for i, layer in enumerate(decoder_layers(model)) for m, lin in layer_linears(layer).items()
    }
    act_sum: dict[tuple[int, str], torch.Tensor] = {}
    act_sq: dict[tuple[int, str], torch.Tensor] = {}
    layer_cos = torch.zeros(n, len(structure.layers))
    embedding = torch.zeros(n, structure.layers[0].hidden)
    with eval_mode(model):
        before = _grad_only_on_projections(model)
        recorder = _ActivationRecorder(model)
        start = time.perf_counter()
        try:
            for s in tqdm(range(n), desc="pool statistics", unit="sample", disable=not progress, leave=False):
                if on_step is not None:
                    on_step("pool statistics", s, n)
                model.zero_grad(set_to_none=True)
                ids = windows[s : s + 1].to(device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                for i, layer in enumerate(decoder_layers(model)):
                    for m, linear in layer_linears(layer).items():
                        taylor[(i, m)][s] = unit_taylor_terms(linear, m).cpu()
                for key in recorder.sums:
                    width = recorder.sums[key].numel()
                    act_sum.setdefault(key, torch.zeros(n, width, dtype=dtype))[s] = recorder.sums[key].cpu()
                    act_sq.setdefault(key, torch.zeros(n, width, dtype=dtype))[s] = recorder.squares[key].cpu()
                layer_cos[s] = torch.stack([recorder.cos[i] for i in range(len(structure.layers))]).cpu()
                embedding[s] = recorder.embedding.cpu()
        finally:
            recorder.remove()
            model.zero_grad(set_to_none=True)
            for p, flag in before.items():
                p.requires_grad_(flag)
    meta = {"seconds": f"{time.perf_counter() - start:.1f}", "samples": str(n)}
    return PoolStatistics(taylor, act_sum, act_sq, layer_cos, embedding, tokens=windows.shape[1], meta=meta)


def taylor_first_exact(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, dtype: torch.dtype | None = None
) -> dict[tuple[int, str], torch.Tensor]:
    """LLM-Pruner's element-wise first-order Taylor on a subset: per unit ``Σ |w · G|``.

    ``G`` is the gradient of the subset's mean LM loss (one backward over the subset, accumulated in
    mini-batches), so this cannot be assembled from per-sample statistics.

    ``dtype`` (e.g. ``torch.float16``, what LLM-Pruner's ``llama3.py`` loads the model in) runs the
    forward and backward on a copy of the model in that dtype, in one batch as LLM-Pruner does, and
    forms ``w · G`` in it; the model itself is left as it is.
    """
    if dtype is not None and dtype != next(model.parameters()).dtype:
        # A copy: casting the model itself there and back would round its weights.
        return taylor_first_exact(copy.deepcopy(model).to(dtype), windows, batch_size=windows.shape[0])
    device = next(model.parameters()).device
    if device.type == "cpu" and next(model.parameters()).dtype in HALF_DTYPES:
        with HalfMatmulInFloat32():
            return _taylor_first_exact(model, windows, batch_size, device)
    return _taylor_first_exact(model, windows, batch_size, device)


def _taylor_first_exact(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device):
    with eval_mode(model):
        before = _grad_only_on_projections(model)
        n = windows.shape[0]
        try:
            model.zero_grad(set_to_none=True)
            for start in range(0, n, batch_size):
                ids = windows[start : start + batch_size].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                (loss * ids.shape[0] / n).backward()  # mean over the whole subset, as one batch would give
            return {
                (i, m): _unit_saliency(linear, m).cpu()
                for i, layer in enumerate(decoder_layers(model)) for m, linear in layer_linears(layer).items()
            }
        finally:
            model.zero_grad(set_to_none=True)
            for p, flag in before.items():
                p.requires_grad_(flag)


HALF_DTYPES = (torch.float16,)  # bfloat16 has native CPU kernels where it matters (AVX512-BF16, AMX)
_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
            torch.ops.aten.baddbmm.default)


class HalfMatmulInFloat32(TorchDispatchMode):
    """float16 matrix products (forward and backward) computed in float32, rounded back to float16.

    That is the arithmetic of a half GEMM with float32 accumulation, as a GPU's and PyTorch's own CPU
    kernels do it, so the results agree up to the order of the float32 sums (1 ulp of float16 in
    about 3 of 1,000 entries, measured). It is 50-100x faster on CPUs without native float16 matrix
    units, where a float16 backward of SmolLM2-135M over 10 windows took 5 minutes; every other
    operation still runs in half precision.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in _MATMULS and tensors and all(t.dtype in HALF_DTYPES for t in tensors):
            dtype = tensors[0].dtype
            widened = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*widened, **kwargs).to(dtype)
        return func(*args, **kwargs)


def _unit_saliency(linear: nn.Linear, module: str) -> torch.Tensor:
    """``Σ |w · g|`` over each unit, the product taken in the weights' own dtype as LLM-Pruner does
    (in fp16 small products underflow to zero), summed to fp32."""
    dim = 0 if module in COLUMN_MODULES else 1
    units = (linear.weight.detach() * linear.weight.grad).abs().sum(dim).float()
    if linear.bias is not None and module not in COLUMN_MODULES and linear.bias.grad is not None:
        units += (linear.bias.detach() * linear.bias.grad).abs().float()
    return units
