"""Pruning plans: how many parameters each layer gives up, and which groups go.

The target is a share of *all* parameters (what papers report; embeddings included) or a parameter
count. It is spread over layers by an :class:`Allocation`:

* ``uniform`` — every layer gives up the same share of its prunable parameters;
* ``layer_range`` — only layers ``first .. last-1`` are pruned (LLM-Pruner spares the first four and
  the last two: ``first=4, last=-2``);
* ``adaptive`` — Adapt-Pruner: a layer that changes its input more (lower cosine similarity between
  its input and output hidden states on the calibration samples) is more important and is pruned
  less. Shares are mapped linearly from that importance, between ``(1 - strength)`` and
  ``(1 + strength)`` times the mean share.

All three are points of one :class:`Allocation` (a pruned layer range times adaptive factors).

**Global ranking** (``scope="global"``, FLAP's adaptive structure across layers and modules): no
per-layer budget at all; every attention group and MLP channel of the pruned layers is ranked by its
score, and the lowest go until the target is met, each unit costing its parameters. Scores must then be
comparable across layers and between attention and MLP (FLAP standardises them per layer: the ``flap``
metric).

**Depth.** An allocation may also remove ``drop_layers`` whole decoder layers (ShortGPT): those whose
output is most like their input on the calibration samples (highest cosine similarity, i.e. lowest
block influence ``1 - cos``). Their parameters count towards the target, and the width budget covers
the rest; layer indices (the pruned range, the dropped layers) always refer to the unpruned model.

**Hardware-friendly sizes.** ``channel_multiple`` rounds each layer's kept MLP channels to a multiple
of it (64 suits GPU matrix units; a layer whose unpruned size is not a multiple keeps channel steps);
the rounding error is carried on like any other, so the target is still met within one rounding step.

Inside a layer, attention groups and MLP channels are paid for in one currency, parameters:
``attn_share`` of the layer's budget is taken as whole attention groups (default: the attention's
share of the layer's parameters), the rest as MLP channels. Rounding errors are carried from layer
to layer, so the plan removes the target within one MLP channel's parameters. A layer always keeps
at least one attention group and one MLP channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import AdaPrunerError
from .importance import GroupScores
from .structure import LayerShape, ModelStructure

STRATEGIES = ("uniform", "layer_range", "adaptive")
SCOPES = ("layer", "global")  # a budget per layer, or one ranking of every unit (see the module docstring)


LLM_PRUNER_LAYERS = (4, -2)  # LLM-Pruner prunes layers 4 .. n-2 of Llama's 32: the first 4 and last 2 spared


@dataclass(frozen=True)
class Allocation:
    """How the budget is spread over layers: one formula covering all three named strategies.

    Layers ``first .. last-1`` are pruned (``last`` <= 0 counts from the end; ``0`` = through the
    last layer); within them each layer's share of the budget is scaled by Adapt-Pruner's factor with
    ``strength`` (0 = uniform). ``uniform`` is ``(0, 0, 0)``, LLM-Pruner's ``layer_range`` is
    ``(4, -2, 0)`` and ``adaptive`` is ``(0, 0, s)``; a search may also combine them.
    """

    first: int = 0
    last: int = 0
    strength: float = 0.0
    attn_share: float | None = None  # share of each layer's budget taken from attention
    drop_layers: int = 0  # whole decoder layers removed, those of lowest block influence
    scope: str = "layer"  # "global": rank every unit of the pruned layers together (strength, attn_share unused)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise AdaPrunerError(f"unknown allocation scope {self.scope!r} (choose from {', '.join(SCOPES)})")
        if isinstance(self.drop_layers, bool) or not isinstance(self.drop_layers, int) or self.drop_layers < 0:
            raise AdaPrunerError(f"drop_layers must be an integer >= 0, got {self.drop_layers!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise AdaPrunerError(f"allocation strength must be in [0, 1], got {self.strength}")
        if self.attn_share is not None and not 0.0 <= self.attn_share <= 1.0:
            raise AdaPrunerError(f"attn_share must be in [0, 1], got {self.attn_share}")

    @classmethod
    def named(cls, strategy: str, first: int = LLM_PRUNER_LAYERS[0], last: int = LLM_PRUNER_LAYERS[1],
              strength: float = 0.5, attn_share: float | None = None) -> Allocation:
        """``uniform``, ``layer_range`` (uses first/last) or ``adaptive`` (uses strength)."""
        if strategy == "uniform":
            return cls(attn_share=attn_share)
        if strategy == "layer_range":
            return cls(first, last, attn_share=attn_share)
        if strategy == "adaptive":
            return cls(strength=strength, attn_share=attn_share)
        raise AdaPrunerError(f"unknown allocation {strategy!r} (choose from {', '.join(STRATEGIES)})")

    @classmethod
    def llm_pruner(cls, n_layers: int) -> Allocation:
        """LLM-Pruner's layer range on an ``n_layers`` model: :data:`LLM_PRUNER_LAYERS`, except that a
        model of fewer than 16 layers spares proportionally fewer (a quarter at the start, an eighth at
        the end), so that something is left to prune."""
        first, last = LLM_PRUNER_LAYERS
        return cls(first=min(first, n_layers // 4), last=-min(-last, n_layers // 8))

    @property
    def needs_layer_cos(self) -> bool:
        return self.strength > 0 or self.drop_layers > 0

    def dropped(self, n_layers: int, layer_cos: torch.Tensor | None) -> tuple[int, ...]:
        """The ``drop_layers`` layers whose output is most like their input (ties: the earlier layer)."""
        if self.drop_layers == 0:
            return ()
        if self.drop_layers >= n_layers:
            raise AdaPrunerError(f"cannot drop {self.drop_layers} of {n_layers} layers (at least one must stay)")
        if layer_cos is None:
            raise AdaPrunerError("dropping layers needs the layers' input/output cosine similarities")
        influence = 1.0 - layer_cos.double()
        return tuple(sorted(torch.sort(influence, stable=True).indices[: self.drop_layers].tolist()))

    def layer_range(self, n_layers: int) -> range:
        first = self.first if self.first >= 0 else n_layers + self.first
        last = self.last if self.last > 0 else n_layers + self.last
        if not 0 <= first < last <= n_layers:
            raise AdaPrunerError(f"layer range {self.first}..{self.last} is empty for {n_layers} layers")
        return range(first, last)

    def layer_weights(self, n_layers: int, layer_cos: torch.Tensor | None,
                      dropped: Sequence[int] = ()) -> list[float]:
        """Relative width-pruning share of each layer (before the budget is scaled to the target);
        ``dropped`` layers, removed whole, take none."""
        pruned = self.layer_range(n_layers)
        weights = [1.0 if i in pruned and i not in dropped else 0.0 for i in range(n_layers)]
        if self.strength == 0:
            return weights
        if layer_cos is None:
            raise AdaPrunerError("adaptive allocation needs the layers' input/output cosine similarities")
        change = 1.0 - layer_cos.double()[pruned.start : pruned.stop]
        span = change.max() - change.min()
        importance = (change - change.min()) / span if span > 0 else torch.full_like(change, 0.5)
        for i, u in zip(pruned, importance.tolist(), strict=True):
            if weights[i] > 0:
                weights[i] = 1.0 + self.strength * (1.0 - 2.0 * u)
        return weights


@dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps: the indices of its attention groups (KV heads) and of its MLP channels."""

    keep_groups: tuple[int, ...]
    keep_channels: tuple[int, ...]


@dataclass(frozen=True)
class PruningPlan:
    """One :class:`LayerPlan` per layer of the unpruned model; the ``dropped`` layers go whole (their
    layer plans are not applied)."""

    layers: tuple[LayerPlan, ...]
    removed_params: int
    total_params: int
    dropped: tuple[int, ...] = ()

    @property
    def removed_share(self) -> float:
        """Share of all parameters removed."""
        return self.removed_params / self.total_params

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """Unpruned-model indices of the layers that stay, in order."""
        return tuple(i for i in range(len(self.layers)) if i not in self.dropped)

    def sizes(self) -> list[dict[str, int]]:
        """Sizes of the layers that stay, in order."""
        return [{"num_key_value_heads": len(self.layers[i].keep_groups),
                 "intermediate_size": len(self.layers[i].keep_channels)} for i in self.kept_layers]

    @classmethod
    def keep_all(cls, structure: ModelStructure) -> PruningPlan:
        layers = tuple(LayerPlan(tuple(range(s.n_groups)), tuple(range(s.n_channels))) for s in structure.layers)
        return cls(layers, 0, structure.total_params)


# What a search or a prune removes unless told: a fifth of all parameters.
DEFAULT_TARGET = 0.2


def check_target(target: float | int) -> float | int:
    """What to remove, checked (the one place it is): a share of all parameters, a float in (0, 1), or a
    parameter count, an int >= 1. Returned unchanged."""
    fraction = isinstance(target, float) and 0.0 < target < 1.0
    count = isinstance(target, int) and not isinstance(target, bool) and target >= 1
    if not (fraction or count):
        raise AdaPrunerError(f"target must be a fraction in (0, 1) or a whole parameter count >= 1, got {target!r}")
    return target


def params_to_remove(structure: ModelStructure, target: float | int) -> int:
    """The parameters to remove: a share in (0, 1) of all of them, or a parameter count (see
    :func:`check_target`), which must not exceed the prunable ones."""
    if isinstance(check_target(target), float):
        return round(target * structure.total_params)
    if target > structure.prunable_params:
        raise AdaPrunerError(f"cannot remove {target} parameters: only {structure.prunable_params} are prunable")
    return int(target)


def _layer_budgets(structure: ModelStructure, n_remove: int, weights: Sequence[float]) -> list[float]:
    """Scale ``weight_i * prunable_i`` to sum to ``n_remove``, capping each layer at its capacity."""
    layers = structure.layers
    capacity = [s.prunable_params - s.group_params - s.channel_params for s in layers]
    budgets = [0.0] * len(layers)
    free = [i for i, w in enumerate(weights) if w > 0]
    remaining = float(n_remove)
    while free:
        mass = sum(weights[i] * layers[i].prunable_params for i in free)
        scale = remaining / mass
        capped = [i for i in free if weights[i] * layers[i].prunable_params * scale > capacity[i]]
        if not capped:
            for i in free:
                budgets[i] = weights[i] * layers[i].prunable_params * scale
            return budgets
        for i in capped:  # fill the layers that cannot take their share, spread the rest again
            budgets[i] = capacity[i]
            remaining -= capacity[i]
        free = [i for i in free if i not in capped]
    if remaining > max(s.channel_params for s in layers):
        raise AdaPrunerError(
            f"cannot remove {n_remove} parameters from the chosen layers without emptying a layer "
            "(lower the target or prune more layers)"
        )
    return budgets


def _grid(shape: LayerShape, multiple: int) -> int:
    """The step of a layer's kept MLP channels: ``multiple`` where its unpruned size is a multiple of it."""
    return multiple if multiple > 1 and shape.n_channels > multiple and shape.n_channels % multiple == 0 else 1


def layer_counts(structure: ModelStructure, n_remove: int, allocation: Allocation,
                 layer_cos: torch.Tensor | None = None, dropped: Sequence[int] = (),
                 channel_multiple: int = 1) -> list[tuple[int, int]]:
    """``(attention groups, MLP channels)`` to remove from each layer (besides the ``dropped`` ones); each
    layer keeps a multiple of ``channel_multiple`` channels where its unpruned size is one."""
    layers = structure.layers
    budgets = _layer_budgets(structure, n_remove, allocation.layer_weights(len(layers), layer_cos, dropped))
    counts, carry_groups, carry = [], 0.0, 0.0
    for shape, budget in zip(layers, budgets, strict=True):
        if budget <= 0:
            counts.append((0, 0))
            continue
        share = allocation.attn_share
        if share is None:
            share = shape.n_groups * shape.group_params / shape.prunable_params
        want_groups = share * budget / shape.group_params + carry_groups
        groups = min(max(round(want_groups), 0), shape.n_groups - 1)
        carry_groups = want_groups - groups
        rest = budget - groups * shape.group_params + carry
        step = _grid(shape, channel_multiple)
        steps = min(max(round(rest / (step * shape.channel_params)), 0), shape.n_channels // step - 1)
        channels = steps * step
        carry = rest - channels * shape.channel_params
        counts.append((groups, channels))
    # Whatever the caps left over goes to layers that still have channels to give (or take back),
    # in whole steps of their grid.
    for i, shape in sorted(enumerate(layers), key=lambda item: -budgets[item[0]]):
        step = _grid(shape, channel_multiple)
        unit = step * shape.channel_params
        if abs(carry) < unit / 2 or budgets[i] <= 0:
            continue
        groups, channels = counts[i]
        move = max(-(channels // step), min(round(carry / unit), (shape.n_channels - channels) // step - 1))
        counts[i] = (groups, channels + move * step)
        carry -= move * unit
    if abs(carry) > max(_grid(s, channel_multiple) * s.channel_params for s in layers):
        raise AdaPrunerError(f"cannot remove {n_remove} parameters without emptying a layer (lower the target)")
    return counts


def global_counts(structure: ModelStructure, scores: GroupScores, n_remove: int, pruned: range,
                  dropped: Sequence[int] = (), channel_multiple: int = 1) -> list[tuple[int, int]]:
    """``(attention groups, MLP channels)`` to remove from each layer by one ranking of every unit of the
    ``pruned`` layers (FLAP's ``AL-AM`` structure): FLAP removes the lowest-scored units up to the point
    where the parameters removed come closest to the target; the MLP channels ranked next are then removed
    (or the last removed ones put back) until the target is met within one channel, as every plan is. A
    layer keeps at least one group and one channel; kept channels are then rounded to ``channel_multiple``
    (see :func:`layer_counts`) with the rounding carried from layer to layer."""
    layers = [i for i in pruned if i not in dropped]
    units = [(float(v), i, 0) for i in layers for v in scores.attn[i].double()] + \
            [(float(v), i, 1) for i in layers for v in scores.mlp[i].double()]
    units.sort(key=lambda unit: unit[0])  # stable: ties keep layer order, attention before MLP
    shapes = structure.layers
    cost = lambda unit: shapes[unit[1]].group_params if unit[2] == 0 else shapes[unit[1]].channel_params  # noqa: E731
    spent, best, cut = 0, abs(n_remove), 0
    for k, unit in enumerate(units):  # FLAP's threshold: the prefix whose cost is closest to the target
        spent += cost(unit)
        if abs(n_remove - spent) < best:
            best, cut = abs(n_remove - spent), k + 1
    counts = [[0, 0] for _ in shapes]
    removed = 0
    for unit in units[:cut]:
        _, i, kind = unit
        if counts[i][kind] < (shapes[i].n_groups, shapes[i].n_channels)[kind] - 1:
            counts[i][kind] += 1
            removed += cost(unit)
    for _, i, kind in units[cut:]:  # more channels, lowest first, while a whole channel is still missing
        if kind == 1 and counts[i][1] < shapes[i].n_channels - 1:
            if n_remove - removed < shapes[i].channel_params / 2:
                break
            counts[i][1] += 1
            removed += shapes[i].channel_params
    for _, i, kind in reversed(units[:cut]):  # or fewer, highest first, while a whole channel too many is gone
        if kind == 1 and counts[i][1] > 0:
            if removed - n_remove < shapes[i].channel_params / 2:
                break
            counts[i][1] -= 1
            removed -= shapes[i].channel_params
    return _round_channels(structure, [(g, c) for g, c in counts], channel_multiple)


def _round_channels(structure: ModelStructure, counts: list[tuple[int, int]],
                    channel_multiple: int) -> list[tuple[int, int]]:
    """``counts`` with each layer's kept channels a multiple of its grid step, the rounding carried on."""
    if channel_multiple <= 1:
        return counts
    rounded, carry = [], 0.0
    for shape, (groups, channels) in zip(structure.layers, counts, strict=True):
        step = _grid(shape, channel_multiple)
        if channels == 0 or step == 1:
            rounded.append((groups, channels))
            continue
        want = channels + carry / shape.channel_params
        steps = min(max(round(want / step), 0), shape.n_channels // step - 1)
        carry = (want - steps * step) * shape.channel_params
        rounded.append((groups, steps * step))
    return rounded


def lowest(scores: torch.Tensor, n: int) -> set[int]:
    # A stable sort breaks ties by index, so plans are reproducible.
    return set(torch.sort(scores.double(), stable=True).indices[:n].tolist())


def removal_counts(structure: ModelStructure, target: float | int, allocation: Allocation = Allocation(),
                   layer_cos: torch.Tensor | None = None, channel_multiple: int = 1,
                   scores: GroupScores | None = None) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """The layers ``allocation`` drops and ``(groups, channels)`` to remove from each layer; ``scores`` are
    needed only by the ``global`` scope, whose counts follow from the ranking."""
    n_remove = params_to_remove(structure, target)
    dropped = allocation.dropped(len(structure.layers), layer_cos)
    depth = sum(structure.layers[i].params for i in dropped)
    if depth > n_remove:
        raise AdaPrunerError(f"dropping {len(dropped)} layers removes {depth:,} parameters, more than the target "
                             f"{n_remove:,} (drop fewer layers)")
    if allocation.scope == "layer":
        return dropped, layer_counts(structure, n_remove - depth, allocation, layer_cos, dropped, channel_multiple)
    if scores is None:
        raise AdaPrunerError("a global allocation needs the importance scores to rank")
    pruned = allocation.layer_range(len(structure.layers))
    return dropped, global_counts(structure, scores, n_remove - depth, pruned, dropped, channel_multiple)


def make_plan(
    structure: ModelStructure,
    scores: GroupScores,
    target: float | int,
    allocation: Allocation = Allocation(),
    layer_cos: torch.Tensor | None = None,
    channel_multiple: int = 1,
) -> PruningPlan:
    """Remove ``target`` parameters: the layers ``allocation`` drops, then per-layer counts from it (or from one
    ranking of every unit), the least important groups; kept MLP channels in multiples of ``channel_multiple``."""
    dropped, counts = removal_counts(structure, target, allocation, layer_cos, channel_multiple, scores)
    layers, removed = [], sum(structure.layers[i].params for i in dropped)
    for shape, attn, mlp, (n_groups, n_channels) in zip(structure.layers, scores.attn, scores.mlp, counts,
                                                        strict=True):
        if attn.numel() != shape.n_groups or mlp.numel() != shape.n_channels:
            raise AdaPrunerError("importance scores do not match the model's layer sizes")
        drop_groups, drop_channels = lowest(attn, n_groups), lowest(mlp, n_channels)
        layers.append(LayerPlan(
            tuple(g for g in range(shape.n_groups) if g not in drop_groups),
            tuple(c for c in range(shape.n_channels) if c not in drop_channels),
        ))
        removed += n_groups * shape.group_params + n_channels * shape.channel_params
    return PruningPlan(tuple(layers), removed, structure.total_params, dropped)


def check_plan(structure: ModelStructure, plan: PruningPlan) -> None:
    """Reject a plan that does not fit the model or would empty a layer's attention or MLP."""
    if len(plan.layers) != len(structure.layers):
        raise AdaPrunerError(f"plan has {len(plan.layers)} layers, the model {len(structure.layers)}")
    if any(not 0 <= i < len(structure.layers) for i in plan.dropped) or len(set(plan.dropped)) != len(plan.dropped):
        raise AdaPrunerError("plan drops an invalid layer index")
    if not plan.kept_layers:
        raise AdaPrunerError("plan would drop every layer")
    for i, (shape, lp) in enumerate(zip(structure.layers, plan.layers, strict=True)):
        for name, keep, size in (("attention group", lp.keep_groups, shape.n_groups),
                                 ("MLP channel", lp.keep_channels, shape.n_channels)):
            if any(not 0 <= k < size for k in keep) or len(set(keep)) != len(keep):
                raise AdaPrunerError(f"layer {i}: plan keeps an invalid {name} index")
            if not keep:
                raise AdaPrunerError(f"layer {i}: plan would remove every {name}")
