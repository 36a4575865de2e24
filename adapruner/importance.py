"""Importance of every prunable group, from pool statistics, for any calibration subset.

A metric first scores *units* (rows of q/k/v/gate/up_proj, columns of o/down_proj) of each module;
a module's score for a group is the sum over the units the group owns; the group's importance is an
aggregate (``sum | mean | max | prod | last``, as LLM-Pruner's group reduction) over the modules of
the group — ``last`` being o_proj for attention and down_proj for the MLP.

Element-wise metrics (``w`` weight, ``g_n`` gradient of sample ``n``'s loss, ``x`` input activation):

=========================  ===============================================  ==============
metric                     unit score                                       per-sample sum
=========================  ===============================================  ==============
``magnitude_l1``           Σ |w|                                            (no data)
``magnitude_l2``           Σ w²                                             (no data)
``taylor_first``           Σ |w · Σ_n g_n|  (LLM-Pruner ``param_first``)    no: backward
``taylor_first_persample`` Σ_n Σ |w · g_n|                                  yes
``taylor_second``          Σ_n Σ (w · g_n)²  (Fisher, ``param_second``)     yes
``taylor_vector``          |Σ_n Σ w · g_n|  (LLM-Pruner ``vectorize``)      yes
``wanda_sp``               Σ |w_ij| · ‖x_j‖₂                                yes
=========================  ===============================================  ==============

``llm_pruner`` is LLM-Pruner's own group importance as its code computes it (``llama3.py``,
``TaylorImportance`` with ``param_first``): ``taylor_first``'s unit scores reduced over the group by
the aggregation (LLM-Pruner's ``grouping_strategy``, ``sum`` by default), except that query heads are
credited to KV groups the way its final alignment step
(``imp.view(len(imp) // min_imp_size, min_imp_size).sum(0)``) lines them up: q_proj rows and o_proj
columns of query head ``h`` count towards KV group ``h mod n_kv``, although the group owns (and a plan
removes) heads ``g * n_rep .. (g + 1) * n_rep - 1``. It is what makes the ``llm-pruner`` baseline
choose LLM-Pruner's groups on GQA models; without GQA it equals ``taylor_first``.

Three metrics score groups directly and ignore the aggregation: ``flap_fluctuation`` (FLAP's
fluctuation: the variance of each input channel of o_proj/down_proj over the calibration tokens times
the squared norm of its weight column, summed over the group's channels), ``flap`` (FLAP's own score
as its code computes it, ``WIFV``: that product, squared for o_proj's columns, standardised over each
layer's columns (``(s - mean) / std``), then averaged over a group's columns; standardised channel
scores for the MLP) and ``random``. ``flap``'s scores are comparable across layers and between
attention and MLP, which is what FLAP's global ranking (:class:`~adapruner.plan.Allocation` ``scope``
``global``) needs; having mean zero in every layer, it is not mixed with other metrics.

A :class:`Mixture` normalises each metric per layer (scores divided by their layer mean, separately
for attention groups and MLP channels, so metrics on different scales can be mixed) and adds them
with non-negative weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import AdaPrunerError
from .statistics import PoolStatistics, SubsetStatistics, check_subset, taylor_first_exact
from .structure import ATTN_MODULES, COLUMN_MODULES, MLP_MODULES, LayerShape, decoder_layers, layer_linears

AGGREGATIONS = ("sum", "mean", "max", "prod", "last")
METRICS = (
    "magnitude_l1", "magnitude_l2", "taylor_first", "taylor_first_persample", "taylor_second",
    "taylor_vector", "wanda_sp", "flap_fluctuation", "flap", "random", "llm_pruner", "wanda_sp_sequential",
)
# Metrics whose scores depend on the plan's per-layer counts (a layer is scored after the layers below it are
# pruned): computed by a pass of their own (:mod:`adapruner.wanda_sp`), never mixed.
PLAN_DEPENDENT = ("wanda_sp_sequential",)
# Metrics that need LLM-Pruner's exact element-wise Taylor: a backward pass over the subset per trial,
# in the dtype named here (None: the model's). LLM-Pruner's llama3.py loads the model in float16 and
# backpropagates in it, and that changes which groups it removes (docs/results.md).
EXACT_TAYLOR_DTYPES: dict[str, torch.dtype | None] = {"taylor_first": None, "llm_pruner": torch.float16}
EXACT_TAYLOR_METRICS = tuple(EXACT_TAYLOR_DTYPES)
# Metrics whose value for a subset is assembled from per-sample statistics (no backward per trial).
DECOMPOSABLE = tuple(m for m in METRICS if m not in EXACT_TAYLOR_METRICS)
GRADIENT_METRICS = ("taylor_first", "taylor_first_persample", "taylor_second", "taylor_vector", "llm_pruner")
ACTIVATION_METRICS = ("wanda_sp", "flap_fluctuation", "flap")


@dataclass
class GroupScores:
    """Importance per layer: ``attn[i]`` has one value per attention group, ``mlp[i]`` per channel."""

    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]

    def normalised(self) -> GroupScores:
        """Each layer's attention and MLP scores divided by their layer mean (as a :class:`Mixture` puts metrics on
        one scale): comparable across layers and between attention and MLP, for a global ranking."""
        return GroupScores([_normalise(a) for a in self.attn], [_normalise(m) for m in self.mlp])


@dataclass
class Mixture:
    """A weighted mixture of metrics with one aggregation; weights need not sum to one."""

    weights: Mapping[str, float]
    aggregation: str = "sum"
    seed: int = 0  # for ``random``

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(METRICS))
        if unknown:
            raise AdaPrunerError(f"unknown importance metric {unknown[0]!r} (choose from {', '.join(METRICS)})")
        if any(w < 0 for w in self.weights.values()):
            raise AdaPrunerError("importance metric weights must be non-negative")
        if not any(w > 0 for w in self.weights.values()):
            raise AdaPrunerError("at least one importance metric needs a positive weight")
        if "flap" in self.active and len(self.active) > 1:
            raise AdaPrunerError("metric 'flap' (standardised, mean zero in every layer) is not mixed with other "
                                 "metrics: mix flap_fluctuation instead")
        if self.plan_dependent and len(self.active) > 1:
            raise AdaPrunerError(f"metric {self.plan_dependent!r} is computed with its plan and is not mixed with "
                                 "other metrics")
        if self.aggregation not in AGGREGATIONS:
            raise AdaPrunerError(f"unknown aggregation {self.aggregation!r} (choose from {', '.join(AGGREGATIONS)})")

    @classmethod
    def single(cls, metric: str, aggregation: str = "sum", seed: int = 0) -> Mixture:
        return cls({metric: 1.0}, aggregation, seed)

    @property
    def active(self) -> dict[str, float]:
        return {m: w for m, w in self.weights.items() if w > 0}

    @property
    def plan_dependent(self) -> str | None:
        """The metric of :data:`PLAN_DEPENDENT` this mixture is, if any."""
        return next((m for m in self.active if m in PLAN_DEPENDENT), None)

    @property
    def needs_backward(self) -> bool:
        return any(m in EXACT_TAYLOR_METRICS for m in self.active)

    @property
    def needs_data(self) -> bool:
        """Whether the pool's per-sample statistics are needed (exact Taylor runs its own backward)."""
        return any(m in GRADIENT_METRICS + ACTIVATION_METRICS and m not in EXACT_TAYLOR_METRICS
                   for m in self.active)


# -- unit scores --------------------------------------------------------------------------------

@dataclass
class WeightSummary:
    """Per-unit weight statistics, ``Σ|w|`` and ``Σw²`` (biases of q/k/v/gate/up rows included).

    They depend on the weights alone, so a search computes them once for its (never modified) unpruned
    model instead of once per trial; for o_proj/down_proj columns they are also what Wanda-sp and
    FLAP multiply their activation statistics with.
    """

    l1: dict[tuple[int, str], torch.Tensor]
    l2: dict[tuple[int, str], torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module) -> WeightSummary:
        l1, l2 = {}, {}
        for i, layer in enumerate(decoder_layers(model)):
            for module, linear in layer_linears(layer).items():
                weight = linear.weight.detach()
                if module in COLUMN_MODULES:  # a column's sums: over every block of rows
                    l1[(i, module)] = torch.zeros(weight.shape[1], device=weight.device)
                    l2[(i, module)] = torch.zeros(weight.shape[1], device=weight.device)
                    for _, block in _float_row_blocks(weight):
                        l1[(i, module)] += block.abs().sum(0)
                        l2[(i, module)] += block.square().sum(0)
                else:
                    l1[(i, module)] = torch.empty(weight.shape[0], device=weight.device)
                    l2[(i, module)] = torch.empty(weight.shape[0], device=weight.device)
                    for start, block in _float_row_blocks(weight):
                        torch.sum(block.abs(), 1, out=l1[(i, module)][start : start + len(block)])
                        torch.sum(block.square(), 1, out=l2[(i, module)][start : start + len(block)])
                    if linear.bias is not None:
                        l1[(i, module)] += linear.bias.detach().float().abs()
                        l2[(i, module)] += linear.bias.detach().float().square()
        return cls({k: v.cpu() for k, v in l1.items()}, {k: v.cpu() for k, v in l2.items()})


UnitScore = Callable[[nn.Linear, str, int, SubsetStatistics | None, WeightSummary], torch.Tensor]


def _magnitude_l1(_linear, module, layer, _stats, weights):
    return weights.l1[(layer, module)]


def _magnitude_l2(_linear, module, layer, _stats, weights):
    return weights.l2[(layer, module)]


def _taylor_term(term: int, absolute: bool = False) -> UnitScore:
    def score(_linear, module, layer, stats, _weights):
        value = stats.taylor[(layer, module)][term]
        return value.abs() if absolute else value

    return score


def _wanda_sp(linear, module, layer, stats, weights):
    norm = stats.input_norm(layer, module)
    if module in COLUMN_MODULES:
        return weights.l1[(layer, module)] * norm  # Σ_i |W_ij| · ‖x_j‖
    return _abs_matvec(linear.weight.detach(), norm).cpu()


def _float_row_blocks(weight: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, rows in fp32)`` of ``weight``. On the CPU a block of 2^18 numbers at a time: a block's
    fp32 copy and what is computed from it stay in the cache instead of being written out for the whole
    matrix (on 2 cores and a 3B model's projections in bf16, 4-6x faster for ``|W| @ v`` and 7x for the
    weight sums, with the same results); elsewhere the whole matrix at once. A block may be ``weight`` itself
    (fp32): never write to it."""
    rows = max(1, 2**18 // weight.shape[1]) if weight.device.type == "cpu" else weight.shape[0]
    for start in range(0, weight.shape[0], rows):
        yield start, weight[start : start + rows].float()


def _abs_matvec(weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``|W| @ v`` in fp32."""
    vector = vector.to(weight.device)
    out = torch.empty(weight.shape[0], device=weight.device)
    for start, block in _float_row_blocks(weight):
        torch.mv(block.abs(), vector, out=out[start : start + len(block)])
    return out


UNIT_SCORES: dict[str, UnitScore] = {
    "magnitude_l1": _magnitude_l1,
    "magnitude_l2": _magnitude_l2,
    "taylor_first_persample": _taylor_term(2),
    "taylor_second": _taylor_term(1),
    "taylor_vector": _taylor_term(0, absolute=True),
    "wanda_sp": _wanda_sp,
}


def _unit_to_group(shape: LayerShape, module: str, units: torch.Tensor) -> torch.Tensor:
    if module in MLP_MODULES:
        return units
    return units.view(shape.n_groups, shape.rows_per_group(module)).sum(1)


def aggregate(per_module: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce ``[modules, groups]`` to ``[groups]``; the last module is o_proj / down_proj."""
    if how == "sum":
        return per_module.sum(0)
    if how == "mean":
        return per_module.mean(0)
    if how == "max":
        return per_module.max(0).values
    if how == "prod":
        return per_module.prod(0)
    if how == "last":
        return per_module[-1]
    raise AdaPrunerError(f"unknown aggregation {how!r}")


def _elementwise_scores(
    model: nn.Module, shapes: Sequence[LayerShape], unit_score: UnitScore, stats: SubsetStatistics | None,
    aggregation: str, weights: WeightSummary,
) -> GroupScores:
    attn, mlp = [], []
    for i, layer in enumerate(decoder_layers(model)):
        linears = layer_linears(layer)
        for modules, out in ((ATTN_MODULES, attn), (MLP_MODULES, mlp)):
            per_module = torch.stack([
                _unit_to_group(shapes[i], m, unit_score(linears[m], m, i, stats, weights).cpu()) for m in modules
            ])
            out.append(aggregate(per_module, aggregation))
    return GroupScores(attn, mlp)


def _llm_pruner_scores(shapes: Sequence[LayerShape], units: Mapping[tuple[int, str], torch.Tensor],
                       aggregation: str, dtype: torch.dtype | None) -> GroupScores:
    """LLM-Pruner's reduction of unit scores to groups, step for step and in its dtype (``TaylorImportance``
    then ``MetaPruner``): each dependency folded onto the root's channels (``imp.view(-1, root).sum(0)``,
    so query head ``h`` lands on KV channel block ``h mod n_kv``), the dependencies stacked and reduced,
    then ``head_dim`` consecutive root channels summed into one KV group. In float16 each of these sums
    rounds, and rounding decides ties, so they are taken in the same order and dtype as LLM-Pruner's."""
    dtype = dtype or torch.float32
    attn, mlp = [], []
    for i, shape in enumerate(shapes):
        root = shape.n_groups * shape.head_dim  # k_proj's rows, the smallest dependency
        deps = [units[(i, m)].to(dtype) for m in ("k_proj", "q_proj", "v_proj", "o_proj")]  # LLM-Pruner's order
        channels = aggregate(torch.stack([d.view(-1, root).sum(0) for d in deps]), aggregation)
        attn.append(channels.view(shape.n_groups, shape.head_dim).sum(1).float())
        mlp.append(aggregate(torch.stack([units[(i, m)].to(dtype) for m in MLP_MODULES]), aggregation).float())
    return GroupScores(attn, mlp)


def _flap_fluctuation(shapes: Sequence[LayerShape], stats: SubsetStatistics, weights: WeightSummary) -> GroupScores:
    attn, mlp = [], []
    for i, shape in enumerate(shapes):
        for module, out in (("o_proj", attn), ("down_proj", mlp)):
            units = stats.input_variance(i, module) * weights.l2[(i, module)]  # variance x ‖W_:,j‖²
            out.append(_unit_to_group(shape, module, units))
    return GroupScores(attn, mlp)


def _standardise(scores: torch.Tensor) -> torch.Tensor:
    if scores.numel() < 2:  # one column left: nothing to rank it against
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / scores.std()


def _flap_layer(n_groups: int, o_fluctuation: torch.Tensor,
                down_fluctuation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's FLAP scores from its fluctuations (variance x ‖W_:,j‖²): per attention group, per channel."""
    return _standardise(o_fluctuation.square()).view(n_groups, -1).mean(1), _standardise(down_fluctuation)


def _flap_scores(shapes: Sequence[LayerShape], stats: SubsetStatistics, weights: WeightSummary) -> GroupScores:
    """FLAP's ``WIFV`` with its standardisation (``lib/prune.py``, ``prune_flap``), per KV group on GQA models:
    a group's score is the mean over its ``n_rep * head_dim`` o_proj columns, where FLAP averages a head's."""
    attn, mlp = [], []
    for i, shape in enumerate(shapes):
        fluctuation = {m: stats.input_variance(i, m) * weights.l2[(i, m)] for m in ("o_proj", "down_proj")}
        groups, channels = _flap_layer(shape.n_groups, fluctuation["o_proj"], fluctuation["down_proj"])
        attn.append(groups)
        mlp.append(channels)
    return GroupScores(attn, mlp)


def flap_remeasured(shapes: Sequence[LayerShape], keep_groups: Sequence[Sequence[int]],
                    keep_channels: Sequence[Sequence[int]],
                    fluctuation: Mapping[tuple[int, str], torch.Tensor]) -> GroupScores:
    """FLAP's scores, as :func:`_flap_scores` computes them, of the units a partly pruned model still has, on the
    unpruned layout: ``fluctuation[(i, module)]`` (the pruned model's input variance x its weight column's squared
    norm, one value per kept o_proj/down_proj column of unpruned layer ``i``) standardised over what layer ``i``
    keeps (``keep_groups[i]``, ``keep_channels[i]``). Units already removed, and every unit of a layer with no
    fluctuation (dropped whole), score ``-inf``: a further plan removes them first."""
    attn, mlp = [], []
    for i, shape in enumerate(shapes):
        groups = torch.full((shape.n_groups,), -torch.inf)
        channels = torch.full((shape.n_channels,), -torch.inf)
        if (i, "o_proj") in fluctuation:
            kept_g, kept_c = list(keep_groups[i]), list(keep_channels[i])
            groups[kept_g], channels[kept_c] = _flap_layer(len(kept_g), fluctuation[(i, "o_proj")],
                                                           fluctuation[(i, "down_proj")])
        attn.append(groups)
        mlp.append(channels)
    return GroupScores(attn, mlp)


def _random_scores(shapes: Sequence[LayerShape], seed: int) -> GroupScores:
    generator = torch.Generator().manual_seed(seed)
    return GroupScores(
        [torch.rand(s.n_groups, generator=generator) for s in shapes],
        [torch.rand(s.n_channels, generator=generator) for s in shapes],
    )


def metric_scores(
    model: nn.Module,
    shapes: Sequence[LayerShape],
    metric: str,
    aggregation: str = "sum",
    stats: SubsetStatistics | None = None,
    exact_taylor: Mapping[tuple[int, str], torch.Tensor] | None = None,
    seed: int = 0,
    weights: WeightSummary | None = None,
) -> GroupScores:
    """Group importance of one metric. ``stats`` are the subset's statistics; ``exact_taylor`` the
    result of :func:`~adapruner.statistics.taylor_first_exact` on the same subset; ``weights`` the
    model's :class:`WeightSummary` (computed here when not given)."""
    if metric == "random":
        return _random_scores(shapes, seed)
    if metric in PLAN_DEPENDENT:
        raise AdaPrunerError(f"metric {metric!r} is scored with its plan (adapruner.wanda_sp), not from statistics")
    if metric in DECOMPOSABLE and metric in GRADIENT_METRICS + ACTIVATION_METRICS and stats is None:
        raise AdaPrunerError(f"metric {metric!r} needs calibration statistics")
    weights = weights if weights is not None else WeightSummary.of(model)
    if metric == "flap_fluctuation":
        return _flap_fluctuation(shapes, stats, weights)
    if metric == "flap":
        return _flap_scores(shapes, stats, weights)
    if metric in EXACT_TAYLOR_METRICS:
        if exact_taylor is None:
            raise AdaPrunerError(f"metric {metric!r} needs a backward pass over the calibration subset")
        unit_score: UnitScore = lambda _lin, module, layer, _stats, _w: exact_taylor[(layer, module)]  # noqa: E731
        if metric == "llm_pruner":
            return _llm_pruner_scores(shapes, exact_taylor, aggregation, EXACT_TAYLOR_DTYPES[metric])
    else:
        unit_score = UNIT_SCORES[metric]
    return _elementwise_scores(model, shapes, unit_score, stats, aggregation, weights)


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    # Dividing by the layer mean keeps each metric's within-layer shape but puts all metrics on one
    # scale; a layer where a metric is identically zero contributes nothing rather than NaN.
    mean = scores.mean()
    return scores / mean if mean > 0 else torch.zeros_like(scores)


def mixture_scores(
    model: nn.Module,
    shapes: Sequence[LayerShape],
    mixture: Mixture,
    stats: SubsetStatistics | None = None,
    exact_taylor: Mapping[str, Mapping[tuple[int, str], torch.Tensor]] | None = None,
    weights: WeightSummary | None = None,
) -> GroupScores:
    """Group importance of a weighted mixture of per-layer-normalised metrics; ``exact_taylor`` maps
    each exact-Taylor metric of the mixture to its :func:`~adapruner.statistics.taylor_first_exact`."""
    exact_taylor = exact_taylor or {}
    active = mixture.active
    weights = weights if weights is not None else WeightSummary.of(model)
    if len(active) == 1:  # a single metric is used as is, so it matches its reference exactly
        (metric,) = active
        return metric_scores(model, shapes, metric, mixture.aggregation, stats, exact_taylor.get(metric), mixture.seed,
                             weights)
    total = sum(active.values())
    attn = [torch.zeros(s.n_groups) for s in shapes]
    mlp = [torch.zeros(s.n_channels) for s in shapes]
    for metric, weight in active.items():
        scores = metric_scores(model, shapes, metric, mixture.aggregation, stats, exact_taylor.get(metric),
                               mixture.seed, weights)
        for i in range(len(shapes)):
            attn[i] += weight / total * _normalise(scores.attn[i])
            mlp[i] += weight / total * _normalise(scores.mlp[i])
    return GroupScores(attn, mlp)


def subset_importance(
    model: nn.Module,
    shapes: Sequence[LayerShape],
    mixture: Mixture,
    subset: Sequence[int],
    stats: PoolStatistics | None = None,
    windows: torch.Tensor | None = None,
    weights: WeightSummary | None = None,
    exact: Mapping[str, dict[tuple[int, str], torch.Tensor]] | None = None,
) -> GroupScores:
    """Importance of every group when calibrated on ``subset`` of the pool.

    ``stats`` are the pool's per-sample statistics (needed by gradient and activation metrics);
    ``windows`` the pool's token windows (needed only by ``taylor_first``, which runs a backward pass
    over the subset's windows); ``weights`` the model's :class:`WeightSummary`, if already computed;
    ``exact`` the unit scores of exact-Taylor metrics on this subset, if already computed.
    """
    pool_size = stats.n_samples if stats is not None else (windows.shape[0] if windows is not None else None)
    if pool_size is None:
        if mixture.needs_data or mixture.needs_backward:
            raise AdaPrunerError("this importance mixture needs calibration data")
        return mixture_scores(model, shapes, mixture, weights=weights)
    idx = check_subset(subset, pool_size)
    sub = None
    if mixture.needs_data:
        if stats is None:
            raise AdaPrunerError("this importance mixture needs the pool's statistics")
        sub = stats.subset(idx)
    exact = dict(exact or {})
    missing = [m for m in mixture.active if m in EXACT_TAYLOR_METRICS and m not in exact]
    if missing and windows is None:
        raise AdaPrunerError("exact Taylor metrics need the calibration windows for their backward pass")
    exact |= {m: taylor_first_exact(model, windows[idx], dtype=EXACT_TAYLOR_DTYPES[m]) for m in missing}
    return mixture_scores(model, shapes, mixture, sub, exact, weights)
