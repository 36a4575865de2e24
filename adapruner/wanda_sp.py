"""Wanda-sp as FLAP's code computes it (``lib/prune.py``, ``prune_wanda_sp``): layer by layer, each layer
scored on the activations of the layers below it *as already pruned*.

For layer ``i`` the calibration windows' hidden states (carried through the pruned layers ``0 .. i-1``)
are passed through the unpruned layer ``i``, recording ``Σ_t x_j²`` of every input column of o_proj and
down_proj; a column's score is ``Σ_r |W_rj| · ‖x_j‖`` (FLAP averages over the rows, the same ranking), a
KV group's the sum over its ``n_rep · head_dim`` o_proj columns (FLAP: a head's 128 columns); the lowest
``counts[i]`` groups and channels are removed, and the pruned layer's outputs feed layer ``i + 1``. So,
unlike the ``wanda_sp`` metric (from the unpruned model's pool statistics, any subset), the score of a layer
depends on what was removed below it, and on how many units each layer loses: a plan's per-layer counts
are an input here, not an output.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .device import eval_mode
from .importance import GroupScores
from .plan import lowest
from .repair import first_layer_inputs, layer_output
from .structure import ATTN_MODULES, COLUMN_MODULES, MLP_MODULES, LayerShape, decoder_layers, group_index, layer_linears


class _SquareSums:
    """Forward pre-hooks adding ``Σ_t x²`` of each input column of o_proj and down_proj of one layer."""

    def __init__(self, layer: nn.Module):
        self.sums: dict[str, torch.Tensor] = {}
        linears = layer_linears(layer)
        self.handles = [linears[m].register_forward_pre_hook(self._hook(m)) for m in COLUMN_MODULES]

    def _hook(self, module: str):
        def hook(_module, args):
            x = args[0].detach().flatten(0, -2).float()
            square = x.square().sum(0)
            self.sums[module] = self.sums[module] + square if module in self.sums else square

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _mask_layer(layer: nn.Module, shape: LayerShape, drop_groups: torch.Tensor,
                drop_channels: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` whose removed groups and channels are zeroed (FLAP's ``unstr`` mode): the same outputs
    as the sliced layer."""
    masked = copy.deepcopy(layer)
    linears = layer_linears(masked)
    with torch.no_grad():
        for names, dropped in ((ATTN_MODULES, drop_groups), (MLP_MODULES, drop_channels)):
            for name in names:
                index = group_index(shape, name, dropped).to(linears[name].weight.device)
                if name in COLUMN_MODULES:
                    linears[name].weight[:, index] = 0
                else:
                    linears[name].weight[index] = 0
                    if linears[name].bias is not None:
                        linears[name].bias[index] = 0
    return masked


@torch.no_grad()
def wanda_sp_sequential(model: nn.Module, shapes: Sequence[LayerShape], windows: torch.Tensor,
                        counts: Sequence[tuple[int, int]], batch_size: int = 8) -> GroupScores:
    """Group scores of Wanda-sp taken layer by layer over ``windows`` (``[N, seq_len]``), layer ``i`` losing its
    lowest ``counts[i] = (groups, channels)`` before layer ``i + 1`` is scored. :func:`~adapruner.plan.make_plan`
    with the same counts then removes exactly the units removed here. ``model`` is not modified."""
    device = next(model.parameters()).device
    batches = [windows[s : s + batch_size].to(device) for s in range(0, windows.shape[0], batch_size)]
    attn, mlp = [], []
    with eval_mode(model):
        hidden, kwargs = first_layer_inputs(model, batches)
        for layer, shape, (n_groups, n_channels) in zip(decoder_layers(model), shapes, counts, strict=True):
            recorder = _SquareSums(layer)
            try:
                for h, kw in zip(hidden, kwargs, strict=True):
                    layer(h, **kw)
            finally:
                recorder.remove()
            linears = layer_linears(layer)
            columns = {m: linears[m].weight.detach().float().abs().sum(0).cpu() * recorder.sums[m].sqrt().cpu()
                       for m in COLUMN_MODULES}
            attn.append(columns["o_proj"].view(shape.n_groups, -1).sum(1))
            mlp.append(columns["down_proj"])
            drop_groups = torch.tensor(sorted(lowest(attn[-1], n_groups)), dtype=torch.long)
            drop_channels = torch.tensor(sorted(lowest(mlp[-1], n_channels)), dtype=torch.long)
            masked = _mask_layer(layer, shape, drop_groups, drop_channels)
            hidden = [layer_output(masked(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
    return GroupScores(attn, mlp)
