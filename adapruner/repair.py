"""Repair after the cut: what the removed input columns of o_proj and down_proj contributed, put back.

A plan removes *input* columns of two projections per layer: o_proj loses the removed heads' columns,
down_proj the removed MLP channels'. With ``W = [W_K W_R]`` split into kept and removed columns, the
unpruned output is ``W_K x_K + W_R x_R``; the cut keeps only ``W_K x_K``. Given the mean ``μ`` and the
covariance ``C`` of the projection's input over many calibration tokens (the unpruned model's), the
repair predicts the removed inputs from the kept ones by ridge regression,
``x̂_R = μ_R + C_RK (C_KK + λ·mean(diag C_KK)·I)⁻¹ (x_K − μ_K)``, and folds ``W_R x̂_R`` into the kept
weights and a bias::

    Δ = W_R C_RK (C_KK + λ d I)⁻¹          W_K' = W_K + Δ          b = W_R μ_R − Δ μ_K

(``d``: the mean variance of the kept inputs). Two limits bracket it: ``λ → ∞`` leaves the kept weights
as they are and adds only the removed channels' mean contribution ``W_R μ_R`` as a bias — FLAP's bias
compensation (An et al., AAAI 2024), which needs nothing but means and carries to any text; ``λ → 0`` is
the least-squares fit with an intercept (SlimLLM's output regression, SlimGPT's closed form restricted to
whole columns), which fits the calibration text best and, from too few tokens, over-fits it. The ridge
shrinks towards the plain cut plus its bias, never towards zero weights. A projection that keeps every
column is left as it is, so a plan that removes nothing changes nothing.

**The ridge's default** is ``λ = k / T``, the kept inputs per calibration token (``k`` columns kept, ``T``
tokens): the estimate's variance grows with the regressors per sample, so the shrinkage should too.
Measured on a text no study reports (Python's documentation, with LLM-Pruner's plan on SmolLM2-135M at
20%, calibrated on books and wiki; docs/results.md): the best ``λ`` fell from 0.1 at 8k tokens to 0.001-0.01
at 65k and 131k, where ``k / T`` is 0.12, 0.016 and 0.008.

Modes (:data:`REPAIR_MODES`):

* ``bias`` — FLAP's bias compensation alone (the ``λ → ∞`` limit; no ridge; it reads only the inputs' means,
  measured without the covariances where these are not already there).
* ``pool`` — the regression above, from the unpruned model's input moments over the *repair windows*:
  hundreds of windows of every calibration source's pool part, far more tokens than any trial's
  calibration subset (one forward pass per job, no gradients, cached on disk; see
  :meth:`~adapruner.session.PruningSession.moments`).
* ``sequential`` — SlimGPT's argument: layer ``i``'s moments are taken from the activations of the
  already pruned and repaired layers below it, so the fit sees the inputs the pruned model will really
  produce; three passes of each cut layer over the calibration windows per trial.

Memory: one ``in × in`` float32 covariance per layer for o_proj and for down_proj: 30 × (576² + 1536²)
× 4 bytes = 323 MB for SmolLM2-135M; 28 × (1536² + 8960²) × 4 bytes = 9.2 GB for Qwen2.5-1.5B; 32 × (4096² +
11008²) × 4 bytes = 17.7 GB for a Llama-2-7B. They are summed in float64, twice that, so :func:`collect_moments`
runs the layers in groups whose sums fit :data:`MOMENTS_CHUNK_BYTES` and writes each group's moments to the cache
before the next; a job reads them memory-mapped, paging in what its repairs read. (Summed all at once and held in
memory, the 1.5B model's moments ended a search on a 24 GB machine: killed for memory at 19.2 GB.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .cache import save_tensors
from .device import eval_mode
from .errors import AdaPrunerError, OnStep
from .plan import PruningPlan
from .structure import decoder_layers, group_index, layer_linears, model_structure, set_output_bias

# Windows of each calibration source's pool part the ``pool`` repair's input moments come from: far more tokens
# than a trial's calibration subset (see the module docstring).
REPAIR_WINDOWS = 256

REPAIR_MODES = ("off", "bias", "pool", "sequential")
# bump when the cached input moments change (2: mean and covariance, from the repair windows; 3: a folder of parts)
MOMENTS_VERSION = 3
# The float64 sums one pass over the repair windows holds at a time: the layers are visited in groups whose sums fit,
# the hidden states carried from one group to the next, and each group's moments are written (when a folder is given)
# before the next begins. All at once, a 1.5B model's 28 down_proj sums (8960 x 8960 each) would take 18 GB.
MOMENTS_CHUNK_BYTES = 2 * 2**30
# The Gram matrices of the moments: inputs at least GRAM_PANEL_MIN wide are cut into GRAM_PANELS row panels, each
# multiplied from its diagonal on (8 measured fastest of 4, 8 and 12 for a 8960-wide input); the float32 products of
# FLUSH_BATCHES batches are summed before they join the float64 sums. See _MomentRecorder.
GRAM_PANELS = 8
GRAM_PANEL_MIN = 2048
FLUSH_BATCHES = 8
# The precision of the repair's solve. A float32 Cholesky factorisation solves a system whose matrix is off by about
# float32's epsilon x k x the mean variance (backward stability): for 7,168 kept columns, 4e-4 of the mean variance,
# below the smallest ridge the search tries (1e-3 of it) and far below the rule's (k / T, 0.1 there); and the result
# is stored in the model's dtype (bfloat16 keeps 3 significant digits). It halves the repair's time on the CPU (a
# 1.5B model's 28 down_proj solves: about 5 s each in float64, 2 s in float32; issue 33) and suits every GPU.
SOLVE_DTYPE = torch.float32
REPAIRED = ("o_proj", "down_proj")  # the projections whose input columns a plan removes
Key = tuple[int, str]  # (layer, module)


@dataclass(frozen=True)
class Repair:
    """How a pruned model's kept weights are re-fitted (``mode`` ``off``: not at all). ``ridge`` is ``λ``
    (relative to the kept inputs' mean variance) for ``pool`` and ``sequential``, ``None`` for the rule ``k / T``
    (see the module docstring); ``bias`` has none."""

    mode: str = "off"
    ridge: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in REPAIR_MODES:
            raise AdaPrunerError(f"unknown repair mode {self.mode!r} (choose from {', '.join(REPAIR_MODES)})")
        if self.ridge is not None and (isinstance(self.ridge, bool) or not isinstance(self.ridge, int | float)
                                       or not 0 < self.ridge < float("inf")):
            raise AdaPrunerError(f"ridge must be a positive number (or None for the rule), got {self.ridge!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class InputMoments:
    """Mean and covariance of each o_proj/down_proj input over ``tokens`` tokens of the unpruned model (the
    covariances empty where only the means were measured: all the ``bias`` mode reads)."""

    mean: Mapping[Key, torch.Tensor]  # [in], float32
    covariance: Mapping[Key, torch.Tensor]  # [in, in], float32
    tokens: int

    def save(self, path: str | Path) -> None:
        tensors = {f"{kind}.{i}.{m}": t.contiguous() for kind, table in (("mean", self.mean),
                                                                         ("covariance", self.covariance))
                   for (i, m), t in table.items()}
        save_tensors(tensors, path, metadata={"tokens": str(self.tokens)})

    @classmethod
    def load(cls, path: str | Path) -> InputMoments:
        """What :meth:`save` wrote, or a folder of such files (:func:`collect_moments`' parts), memory-mapped:
        a repair pages in the covariances it reads."""
        from safetensors import safe_open

        path = Path(path)
        tables: dict[str, dict[Key, torch.Tensor]] = {"mean": {}, "covariance": {}}
        tokens = 0
        for part in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
            with safe_open(str(part), framework="pt") as f:
                tokens = int(f.metadata()["tokens"])
                for name in f.keys():
                    kind, layer, module = name.split(".")
                    tables[kind][(int(layer), module)] = f.get_tensor(name)
        return cls(tables["mean"], tables["covariance"], tokens)


def compensate(weight: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor | None, keep: torch.Tensor,
               ridge: float | None, tokens: int = 0,
               dtype: torch.dtype = SOLVE_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_K', b)`` for the kept columns ``keep`` of ``weight`` (see the module docstring), computed in ``dtype``
    (:data:`SOLVE_DTYPE`) and returned in ``weight``'s; ``covariance`` ``None``: the bias alone (``λ → ∞``);
    ``ridge`` ``None``: ``k / tokens``, the kept columns per token the moments were measured on."""
    w = weight.to(dtype)
    device = w.device
    keep = keep.to(device)
    removed = torch.ones(w.shape[1], dtype=torch.bool, device=device)
    removed[keep] = False
    mean = mean.to(device, dtype)
    w_removed = w[:, removed]
    bias = w_removed @ mean[removed]
    kept = w[:, keep]
    if covariance is not None and removed.any():
        c = covariance.to(device)
        c_kk = c[keep][:, keep].to(dtype)
        if ridge is None:
            if tokens < 1:
                raise AdaPrunerError("the ridge's rule needs the number of tokens the moments were measured on")
            ridge = keep.numel() / tokens
        scale = c_kk.diagonal().mean().clamp_min(1e-30)
        c_kk.diagonal().add_(ridge * scale)
        factor, info = torch.linalg.cholesky_ex(c_kk)
        for _ in range(12):  # not positive definite in this precision (inputs that never vary, say): damp more
            if not info.item():
                break
            c_kk.diagonal().add_(scale)
            scale = scale * 10
            factor, info = torch.linalg.cholesky_ex(c_kk)
        if not info.item():  # else nothing to regress on: the bias alone
            delta = torch.cholesky_solve((w_removed @ c[removed][:, keep].to(dtype)).T, factor).T  # [out, k]
            kept = kept + delta
            bias = bias - delta @ mean[keep]
    return kept.to(weight.dtype), bias.to(weight.dtype)


def kept_columns(structure, plan: PruningPlan) -> dict[Key, torch.Tensor]:
    """Kept input columns of each o_proj/down_proj that ``plan`` cuts (on the unpruned layout ``structure``)."""
    table: dict[Key, torch.Tensor] = {}
    for i, (shape, lp) in enumerate(zip(structure.layers, plan.layers, strict=True)):
        if i in plan.dropped:
            continue
        if len(lp.keep_groups) < shape.n_groups:
            table[(i, "o_proj")] = group_index(shape, "o_proj", torch.tensor(lp.keep_groups, dtype=torch.long))
        if len(lp.keep_channels) < shape.n_channels:
            table[(i, "down_proj")] = torch.tensor(lp.keep_channels, dtype=torch.long)
    return table


def _refit(target: nn.Linear, full: nn.Linear, mean: torch.Tensor, covariance: torch.Tensor | None,
           columns: torch.Tensor, ridge: float | None, tokens: int) -> None:
    """Write the compensated weight into the sliced ``target`` and add the bias (created if it has none)."""
    weight, bias = compensate(full.weight, mean, covariance, columns, ridge, tokens)
    target.weight.copy_(weight)
    if full.bias is not None:
        bias = bias + full.bias.detach()
    if target.bias is None:
        target.bias = nn.Parameter(bias, requires_grad=target.weight.requires_grad)
    else:
        target.bias.copy_(bias)


@torch.no_grad()
def repair_pruned(pruned: nn.Module, unpruned: nn.Module, plan: PruningPlan, moments: InputMoments,
                  repair: Repair) -> nn.Module:
    """Repair, in place, the sliced o_proj/down_proj of ``pruned`` (``plan`` applied to ``unpruned``) from the
    unpruned model's input ``moments``, as ``repair`` (mode ``bias`` or ``pool``) says; returns ``pruned``."""
    if repair.mode not in ("bias", "pool"):
        raise AdaPrunerError(f"repair_pruned takes the modes bias and pool, not {repair.mode!r}")
    keep = kept_columns(model_structure(unpruned), plan)
    unpruned_layers, pruned_layers = decoder_layers(unpruned), decoder_layers(pruned)
    position = {i: p for p, i in enumerate(plan.kept_layers)}  # unpruned index -> index in the pruned stack
    if repair.mode == "pool" and keep and not moments.covariance:
        raise AdaPrunerError("the pool repair needs the inputs' covariances; these moments hold their means only")
    for (i, module), columns in keep.items():
        covariance = moments.covariance[(i, module)] if repair.mode == "pool" else None
        _refit(layer_linears(pruned_layers[position[i]])[module], layer_linears(unpruned_layers[i])[module],
               moments.mean[(i, module)], covariance, columns, repair.ridge, moments.tokens)
    if keep:
        give_output_biases(pruned)
    return pruned


def give_output_biases(model: nn.Module) -> None:
    """Give every o_proj and down_proj that has none a zero bias, and record it in the config: a repaired model
    carries one in every layer, so that its export describes each layer the same way."""
    for layer in decoder_layers(model):
        for linear in (layer_linears(layer)[m] for m in REPAIRED):
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device),
                                           requires_grad=linear.weight.requires_grad)
    set_output_bias(model.config)


class _MomentRecorder:
    """Forward pre-hooks that add ``Σ (x - s)`` and (with ``grams``) ``Σ (x - s)ᵀ(x - s)`` of each o_proj/down_proj
    input ``x``, in float64, ``s`` the first batch's mean (a shift: sums about the mean lose nothing to the
    cancellation of a large mean, so that the products can be formed and summed over :data:`FLUSH_BATCHES` batches
    in float32 before they join the float64 sums).

    The Gram matrices are formed as their upper triangle in blocks (:func:`gram_edges`): about half the products of
    ``xᵀx`` (a 1.5B model's 8960-wide down_proj input, 1,024 tokens: 0.50 s against 1.24 s for the full float32
    product and its float64 sum, on 2 cores, means of 3 runs)."""

    def __init__(self, layers: dict[int, nn.Module], modules=REPAIRED, grams: bool = True):
        self.with_grams = grams
        self.shift: dict[Key, torch.Tensor] = {}
        self.sums: dict[Key, torch.Tensor] = {}
        self.tokens: dict[Key, int] = {}
        self.grams: dict[Key, torch.Tensor] = {}  # float64, the upper blocks
        self.partial: dict[Key, torch.Tensor] = {}  # float32, the upper blocks of the batches since the last flush
        self.partial_batches: dict[Key, int] = {}
        self.handles = [layer_linears(layer)[m].register_forward_pre_hook(self._hook((i, m)))
                        for i, layer in layers.items() for m in modules]

    def _hook(self, key):
        def hook(_module, args):
            x = args[0].detach().flatten(0, -2).float()
            if key not in self.shift:
                self.shift[key] = x.mean(0)
                self.sums[key] = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
                self.tokens[key] = 0
            x = x - self.shift[key]
            self.sums[key] += x.sum(0, dtype=torch.float64)
            self.tokens[key] += x.shape[0]
            if self.with_grams:
                self._add_gram(key, x)

        return hook

    def _add_gram(self, key: Key, x: torch.Tensor) -> None:
        if key not in self.partial:
            self.partial[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.partial_batches[key] = 0
        edges = gram_edges(x.shape[1])
        for i in range(len(edges) - 1):
            rows = slice(edges[i], edges[i + 1])
            self.partial[key][rows, edges[i]:].addmm_(x[:, rows].T, x[:, edges[i]:])
        self.partial_batches[key] += 1
        if self.partial_batches[key] == FLUSH_BATCHES:
            self._flush(key)

    def _flush(self, key: Key) -> None:
        if not self.partial_batches.get(key):
            return
        if key in self.grams:
            self.grams[key] += self.partial[key]
        else:
            self.grams[key] = self.partial[key].double()
        self.partial[key].zero_()
        self.partial_batches[key] = 0

    def moments(self, key: Key) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, covariance) in float64; the covariance ``None`` without ``grams``."""
        n = self.tokens[key]
        centred = self.sums[key] / n  # the mean of x - s
        mean = centred + self.shift[key].double()
        if not self.with_grams:
            return mean, None
        self._flush(key)
        gram = self.grams[key]
        edges = gram_edges(gram.shape[0])
        for i in range(1, len(edges) - 1):  # the lower blocks, from the upper
            gram[edges[i]:, edges[i - 1]:edges[i]] = gram[edges[i - 1]:edges[i], edges[i]:].T
        return mean, gram / n - torch.outer(centred, centred)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def gram_edges(width: int) -> list[int]:
    """Where the Gram matrix of ``width`` inputs is cut into row panels, of which only the blocks on and above the
    diagonal are formed: :data:`GRAM_PANELS` of them from :data:`GRAM_PANEL_MIN` inputs, else one."""
    panels = GRAM_PANELS if width >= GRAM_PANEL_MIN else 1
    return [round(width * i / panels) for i in range(panels + 1)]


@torch.no_grad()
def collect_moments(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True,
                    on_step: OnStep | None = None, folder: str | Path | None = None,
                    chunk_bytes: int = MOMENTS_CHUNK_BYTES, covariance: bool = True) -> InputMoments:
    """Mean and covariance of every o_proj and down_proj input over ``windows`` (``[N, seq_len]``), summed in
    float64 and stored float32 on the CPU. The decoder layers are run in groups whose float64 sums fit in
    ``chunk_bytes`` (:data:`MOMENTS_CHUNK_BYTES`), the hidden states carried between groups; with ``folder``, each
    group's moments are written there as a part (``part-000.safetensors``, ...) as soon as they are known and the
    result is the folder, memory-mapped (:meth:`InputMoments.load`), so that no more than one group's moments are
    ever held in memory. Without ``covariance``, the means alone (all the ``bias`` mode reads): one group, no
    products, nothing of the memory."""
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    groups = _layer_groups(layers, chunk_bytes) if covariance else [list(range(len(layers)))]
    batches = [windows[s : s + batch_size].to(device) for s in range(0, windows.shape[0], batch_size)]
    means: dict[Key, torch.Tensor] = {}
    covariances: dict[Key, torch.Tensor] = {}
    phase = "repair moments" if covariance else "repair means"
    with eval_mode(model), tqdm(total=len(groups) * len(batches), desc=phase, unit="batch",
                                disable=not progress, leave=False) as bar:
        hidden, kwargs = first_layer_inputs(model, batches)
        for g, group in enumerate(groups):
            recorder = _MomentRecorder({i: layers[i] for i in group}, grams=covariance)
            try:
                for b, kw in enumerate(kwargs):
                    if on_step is not None:
                        on_step(phase, g * len(batches) + b, len(groups) * len(batches))
                    h = hidden[b]
                    for i in group:
                        h = layer_output(layers[i](h, **kw))
                    hidden[b] = h
                    bar.update()
            finally:
                recorder.remove()
            measured = {k: recorder.moments(k) for k in recorder.sums}
            part = InputMoments({k: m.float().cpu() for k, (m, _) in measured.items()},
                                {k: c.float().cpu() for k, (_, c) in measured.items() if c is not None},
                                windows.numel())
            del recorder, measured  # the group's float64 sums, before the next group's
            if folder is None:
                means |= part.mean
                covariances |= part.covariance
            else:
                part.save(Path(folder) / f"part-{g:03d}.safetensors")
    return InputMoments(means, covariances, windows.numel()) if folder is None else InputMoments.load(folder)


def _layer_groups(layers: nn.ModuleList, chunk_bytes: int) -> list[list[int]]:
    """Consecutive layer indices whose float64 input sums (o_proj's and down_proj's) fit in ``chunk_bytes`` (one
    layer at least per group)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, layer in enumerate(layers):
        need = sum(12 * layer_linears(layer)[m].in_features ** 2 for m in REPAIRED)  # float64 sums, float32 partial
        if groups[-1] and used + need > chunk_bytes:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += need
    return groups


class _LayerInputs(Exception):
    """Raised by a hook on the first decoder layer to stop the forward once its inputs are caught."""


@torch.no_grad()
def repair_sequential(pruned: nn.Module, unpruned: nn.Module, plan: PruningPlan, windows: torch.Tensor,
                      ridge: float | None, batch_size: int = 8) -> nn.Module:
    """Re-fit layer by layer, each input's moments taken from the pruned model's own (already repaired)
    activations.

    The calibration windows' hidden states are carried through ``pruned`` one decoder layer at a time.
    The target of a cut projection is the *unpruned* projection's output on the pruned model's real
    inputs, so its full-width input is measured by running the unpruned block (attention, then MLP) in
    the pruned layer's place: one pass for o_proj's moments (o_proj is then re-fitted), one for
    down_proj's, behind the re-fitted attention (down_proj is then re-fitted), and one through the
    repaired layer for the next layer's hidden states. Returns ``pruned``, repaired in place.
    """
    keep = kept_columns(model_structure(unpruned), plan)
    device = next(pruned.parameters()).device
    layers, unpruned_layers = decoder_layers(pruned), decoder_layers(unpruned)
    batches = [windows[s : s + batch_size].to(device) for s in range(0, windows.shape[0], batch_size)]
    hidden, kwargs = first_layer_inputs(pruned, batches)
    with eval_mode(pruned):
        for i, layer in zip(plan.kept_layers, layers, strict=True):  # i: the layer's index in the unpruned model
            for module, block in (("o_proj", "self_attn"), ("down_proj", "mlp")):
                if (i, module) not in keep:
                    continue
                own = getattr(layer, block)
                setattr(layer, block, getattr(unpruned_layers[i], block))  # the unpruned block on the pruned inputs
                recorder = _MomentRecorder({i: unpruned_layers[i]}, (module,))
                try:
                    for h, kw in zip(hidden, kwargs, strict=True):
                        layer(h, **kw)
                finally:
                    recorder.remove()
                    setattr(layer, block, own)
                mean, covariance = recorder.moments((i, module))
                _refit(layer_linears(layer)[module], layer_linears(unpruned_layers[i])[module], mean, covariance,
                       keep[(i, module)], ridge, recorder.tokens[(i, module)])
            hidden = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
    if keep:
        give_output_biases(pruned)
    return pruned


def layer_output(output) -> torch.Tensor:
    """A decoder layer's hidden states, whether it returns them alone or in a tuple."""
    return output[0] if isinstance(output, tuple) else output


def first_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list, list]:
    """The hidden states and keyword arguments (masks, rotary embeddings) the first decoder layer gets."""
    hidden, kwargs = [], []

    def catch(_module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _LayerInputs

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _LayerInputs:
                pass
    finally:
        handle.remove()
    return hidden, kwargs
