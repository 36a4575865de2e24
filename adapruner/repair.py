"""Repair after the cut: re-fit the kept input columns of o_proj and down_proj by least squares.

A plan removes *input* columns of two projections per layer: o_proj loses the removed heads' columns,
down_proj the removed MLP channels'. Their outputs then miss what those columns contributed. Given the
Gram matrix ``G = Xᵀ X`` of the projection's input over calibration tokens, the kept columns ``K`` of
``W`` are re-fitted so the pruned output matches the dense one in least squares (SlimLLM's output
regression; SlimGPT/FASP's closed-form update restricted to whole columns)::

    W_K' = W G[:, K] (G[K, K] + λ · mean(diag G[K, K]) · I)⁻¹

``λ`` (``ridge``) is relative to the Gram's scale, as GPTQ's dampening is. A projection that keeps
every column is left as it is, so a plan that removes nothing changes nothing.

Two modes (:data:`REPAIR_MODES`):

* ``pool`` — the Grams of the *dense* model's inputs over the whole calibration pool, one forward
  pass per job, cached on disk beside the pool statistics (see
  :meth:`~adapruner.session.PruningSession.grams`). The pool, not the trial's subset: a subset of 4-32
  windows has 512-4096 tokens, fewer than down_proj's kept columns on most models, so its Gram is
  singular and the ridge, not the data, would decide the fit.
* ``sequential`` — SlimGPT's argument: layer ``i``'s Grams are taken from the activations of the
  already pruned and repaired layers below it, so the fit sees the inputs the pruned model will
  really produce. It costs three passes of each cut layer over the calibration windows per trial
  (dense attention, dense MLP, then the repaired layer): 35x the ``pool`` mode's re-fit here.

Memory: one ``in × in`` float32 Gram per layer for o_proj and for down_proj: 30 × (576² + 1536²) × 4
bytes = 323 MB for SmolLM2-135M; 32 × (4096² + 11008²) × 4 bytes = 17.7 GB for a Llama-2-7B.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import AdaPrunerError, OnStep
from .plan import PruningPlan
from .structure import decoder_layers, group_index, layer_linears, model_structure

REPAIR_MODES = ("off", "pool", "sequential")
GRAM_VERSION = 1  # bump when the cached Grams change
REPAIRED = ("o_proj", "down_proj")  # the projections whose input columns a plan removes
Grams = Mapping[tuple[int, str], torch.Tensor]  # (layer, module) -> [in, in]


@dataclass(frozen=True)
class Repair:
    """How a pruned model's kept weights are re-fitted (``mode`` ``off``: not at all)."""

    mode: str = "off"
    ridge: float = 1e-2

    def __post_init__(self) -> None:
        if self.mode not in REPAIR_MODES:
            raise AdaPrunerError(f"unknown repair mode {self.mode!r} (choose from {', '.join(REPAIR_MODES)})")
        if not (self.ridge > 0 and self.ridge < float("inf")):
            raise AdaPrunerError(f"ridge must be a positive number, got {self.ridge!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float,
                  weight_gram: torch.Tensor | None = None) -> torch.Tensor:
    """``W G[:, K] (G[K, K] + λ mean(diag G[K, K]) I)⁻¹`` in float64, returned in ``weight``'s dtype.

    ``weight_gram`` is ``W G``, if already computed (it depends on the dense weight and the Gram only,
    not on what a plan keeps, so a search computes it once per job: :func:`weight_grams`).
    """
    g = gram.to(device=weight.device, dtype=torch.float64)
    keep = keep.to(weight.device)
    g_kk = g[keep][:, keep]
    damp = ridge * g_kk.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    g_kk.diagonal().add_(damp)
    wg = weight_gram.to(weight.device) if weight_gram is not None else weight.double() @ g
    rhs = wg[:, keep].double()  # [out, k]
    factor = torch.linalg.cholesky(g_kk)
    return torch.cholesky_solve(rhs.T, factor).T.to(weight.dtype)


@torch.no_grad()
def weight_grams(dense: nn.Module, grams: Grams) -> dict[tuple[int, str], torch.Tensor]:
    """``W G`` of every repaired projection of ``dense``, float32 (as the Grams are stored)."""
    layers = decoder_layers(dense)
    products = {}
    for (i, module), gram in grams.items():
        weight = layer_linears(layers[i])[module].weight
        products[(i, module)] = (weight.double() @ gram.to(weight.device, torch.float64)).float()
    return products


def kept_columns(structure, plan: PruningPlan) -> dict[tuple[int, str], torch.Tensor]:
    """Kept input columns of each o_proj/down_proj that ``plan`` cuts (on the dense layout ``structure``)."""
    table: dict[tuple[int, str], torch.Tensor] = {}
    for i, (shape, lp) in enumerate(zip(structure.layers, plan.layers, strict=True)):
        if i in plan.dropped:
            continue
        if len(lp.keep_groups) < shape.n_groups:
            table[(i, "o_proj")] = group_index(shape, "o_proj", torch.tensor(lp.keep_groups, dtype=torch.long))
        if len(lp.keep_channels) < shape.n_channels:
            table[(i, "down_proj")] = torch.tensor(lp.keep_channels, dtype=torch.long)
    return table


@torch.no_grad()
def repair_pruned(pruned: nn.Module, dense: nn.Module, plan: PruningPlan, grams: Grams, ridge: float,
                  products: Grams | None = None) -> nn.Module:
    """Re-fit, in place, the sliced o_proj/down_proj of ``pruned`` (``plan`` applied to ``dense``) from
    the dense model's input Grams (and their :func:`weight_grams` ``products``, if computed); returns
    ``pruned``."""
    keep = kept_columns(model_structure(dense), plan)
    dense_layers, pruned_layers = decoder_layers(dense), decoder_layers(pruned)
    position = {i: p for p, i in enumerate(plan.kept_layers)}  # dense index -> index in the pruned stack
    for (i, module), columns in keep.items():
        full = layer_linears(dense_layers[i])[module].weight
        target = layer_linears(pruned_layers[position[i]])[module].weight
        product = products.get((i, module)) if products is not None else None
        target.copy_(refit_columns(full, grams[(i, module)], columns, ridge, product))
    return pruned


class _GramRecorder:
    """Forward pre-hooks that add ``xᵀ x`` of each o_proj/down_proj input to a float64 Gram."""

    def __init__(self, layers: dict[int, nn.Module], modules=REPAIRED):
        self.grams: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = [layer_linears(layer)[m].register_forward_pre_hook(self._hook((i, m)))
                        for i, layer in layers.items() for m in modules]

    def _hook(self, key):
        def hook(_module, args):
            x = args[0].detach().flatten(0, -2).float()
            gram = (x.T @ x).double()  # float32 product per batch, float64 running sum
            self.grams[key] = self.grams[key] + gram if key in self.grams else gram

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def collect_grams(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = True,
                  on_step: OnStep | None = None) -> dict:
    """Input Grams of every o_proj and down_proj over ``windows`` (``[N, seq_len]``), float32 on the CPU."""
    device = next(model.parameters()).device
    recorder = _GramRecorder(dict(enumerate(decoder_layers(model))))
    was_training = model.training
    model.eval()
    try:
        starts = range(0, windows.shape[0], batch_size)
        for start in tqdm(starts, desc="repair Grams", unit="batch", disable=not progress, leave=False):
            if on_step is not None:
                on_step("repair Grams", start, windows.shape[0])
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        recorder.remove()
        model.train(was_training)
    return {key: gram.float().cpu() for key, gram in recorder.grams.items()}


class _LayerInputs(Exception):
    """Raised by a hook on the first decoder layer to stop the forward once its inputs are caught."""


@torch.no_grad()
def repair_sequential(pruned: nn.Module, dense: nn.Module, plan: PruningPlan, windows: torch.Tensor, ridge: float,
                      batch_size: int = 8) -> nn.Module:
    """Re-fit layer by layer, each Gram taken from the pruned model's own (already repaired) activations.

    The calibration windows' hidden states are carried through ``pruned`` one decoder layer at a time.
    The target of a cut projection is the *dense* projection's output on the pruned model's real
    inputs, so its full-width input is measured by running the dense block (attention, then MLP) in
    the pruned layer's place: one pass for o_proj's Gram (o_proj is then re-fitted), one for
    down_proj's, behind the re-fitted attention (down_proj is then re-fitted), and one through the
    repaired layer for the next layer's hidden states. Returns ``pruned``, repaired in place.
    """
    keep = kept_columns(model_structure(dense), plan)
    device = next(pruned.parameters()).device
    layers, dense_layers = decoder_layers(pruned), decoder_layers(dense)
    batches = [windows[s : s + batch_size].to(device) for s in range(0, windows.shape[0], batch_size)]
    hidden, kwargs = _first_layer_inputs(pruned, batches)
    was_training = pruned.training
    pruned.eval()
    try:
        for i, layer in zip(plan.kept_layers, layers, strict=True):  # i: the layer's index in the dense model
            for module, block in (("o_proj", "self_attn"), ("down_proj", "mlp")):
                if (i, module) not in keep:
                    continue
                own = getattr(layer, block)
                setattr(layer, block, getattr(dense_layers[i], block))  # the dense block on the pruned inputs
                recorder = _GramRecorder({i: dense_layers[i]}, (module,))
                try:
                    for h, kw in zip(hidden, kwargs, strict=True):
                        layer(h, **kw)
                finally:
                    recorder.remove()
                    setattr(layer, block, own)
                full = layer_linears(dense_layers[i])[module].weight
                target = layer_linears(layer)[module].weight
                target.copy_(refit_columns(full, recorder.grams[(i, module)], keep[(i, module)], ridge))
            hidden = [_hidden(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
    finally:
        pruned.train(was_training)
    return pruned


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _first_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list, list]:
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
