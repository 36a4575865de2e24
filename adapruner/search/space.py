"""AdaPruner's search space: calibration subset x importance mixture x layer allocation.

**Calibration subset.** A subset of an ``N``-sample pool is a point in ``{0,1}^N``; asked to search
that directly (or as ``k`` categorical slot indices), TPE and GP see ``N`` unrelated dimensions in
which neighbouring values mean nothing, and learn little in a few dozen trials. Instead the pool is
clustered once (k-means on each sample's mean final hidden state, recorded by the statistics pass),
and a trial chooses a subset size ``k`` and one weight per cluster: ``k`` is shared among clusters in
proportion to the weights, and each cluster contributes its samples nearest to its centroid first.
This is a low-dimensional, continuous encoding in which nearby parameters give overlapping subsets,
which is what Bayesian optimization can exploit; with several text sources the clusters follow the
sources, so it also covers a per-source mixture. ``bench/search.py`` measures it against plain
random subsets (``subset_mode="random"``: a size and a seed per trial).

**Importance.** One weight in ``[0, 1]`` per metric (relative: the mixture divides by their sum) and the
aggregation. The default metrics are those computed from cached statistics; ``taylor_first`` may be
added but costs a backward pass per trial. Or (``score`` ``flap``) FLAP's own standardised score of the
subset instead of the mixture: it is not mixed (mean zero in every layer), and it is the one score here
that ranks attention groups and MLP channels of different layers on one scale (see ``scope``).

**Allocation.** One flat parameterisation of :class:`Allocation`: layers spared at the start and at
the end, the adaptive strength, the share of each layer's budget taken from attention, and the scope:
a budget per layer, or FLAP's one ranking of every unit of the pruned layers (``global``, where the
strength and the attention share play no part). Flat (no conditional parameters), so every sampler —
TPE, GP, BoTorch, QMC — handles it. With ``depth`` the
number of whole layers dropped (0 .. a quarter of them, and never more than the target pays for; with a floor on
the decode speed-up, from the fewest that can meet it up to half of them: :mod:`.speed`) is searched too; fixing
``drop_layers`` sets it.

**Iterations.** With FLAP's score, the plan may be built in 1-4 steps, FLAP's score re-measured on the model
pruned and repaired so far between them (:class:`~adapruner.session.PruneConfig` ``iterations``); with the
mixture, one step (its gradients would need a statistics pass per step).

**Repair.** Whether (and how) the kept o_proj/down_proj columns are repaired after the cut
(:mod:`adapruner.repair`: FLAP's bias compensation, or the ridge regression from the repair windows), and
the ridge ``λ`` on a log scale.

Any parameter can be fixed (``SearchSpace(fixed={"aggregation": "sum"})``): it is then not
searched, and a study's trials record only what was searched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
import torch

from ..errors import AdaPrunerError
from ..importance import AGGREGATIONS, METRICS, Mixture
from ..plan import SCOPES, Allocation
from ..repair import REPAIR_MODES, Repair
from ..session import PruneConfig

DEFAULT_METRICS = ("magnitude_l1", "magnitude_l2", "taylor_first_persample", "taylor_second", "taylor_vector",
                   "wanda_sp", "flap_fluctuation")
# How a trial's calibration subset is chosen: clusters of the pool weighted per trial, a random size and seed, the
# whole pool.
SUBSET_MODES = ("clusters", "random", "all")
SCORES = ("mixture", "flap")  # a trial's importance: the weighted mixture of metrics, or FLAP's standardised score


# What each parameter of a trial may be fixed to (see suggest_config): a range or a tuple of choices.
_UNIT = ("number", 0.0, 1.0)
FIXABLE: dict[str, tuple] = {
    "calib_size": ("integer", 1, None), "calib_seed": ("integer", 0, 2**20), "aggregation": AGGREGATIONS,
    "layer_first": ("integer", 0, None), "layer_last": ("integer", 0, None), "strength": _UNIT, "attn_share": _UNIT,
    "repair": REPAIR_MODES, "ridge": ("positive number", 0.0, None), "drop_layers": ("integer", 0, None),
    "scope": SCOPES, "score": SCORES, "iterations": ("integer", 1, None),
    **{f"w_{m}": _UNIT for m in METRICS},
}


_CLUSTER_WEIGHT = "calib_c"  # a trial's weight of one cluster of the pool: calib_c0, calib_c1, ...


def cluster_weight(c: int) -> str:
    """The name of a trial's weight of the pool's cluster ``c`` (see the module docstring)."""
    return f"{_CLUSTER_WEIGHT}{c}"


def cluster_index(name: str) -> int | None:
    """``c`` where ``name`` is :func:`cluster_weight` ``(c)``, else ``None``."""
    digits = name.removeprefix(_CLUSTER_WEIGHT)
    return int(digits) if digits != name and digits.isdigit() else None


def _in_range(value: Any, kind: str, low: float, high: float | None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    if kind == "integer" and not isinstance(value, int):
        return False
    return (value > low if kind == "positive number" else value >= low) and (high is None or value <= high)


def check_fixed(name: str, value: Any, n_clusters: int) -> None:
    """A fixed parameter must be one that trials have (``calib_c0`` .. one per cluster), in its range."""
    cluster = cluster_index(name)
    if cluster is not None and cluster < n_clusters:
        domain = _UNIT
    elif name in FIXABLE:
        domain = FIXABLE[name]
    else:
        raise AdaPrunerError(f"cannot fix {name!r}: not a search parameter (choose from {', '.join(FIXABLE)}, "
                             f"{cluster_weight(0)}..{cluster_weight(n_clusters - 1)})")
    if domain[0] in ("integer", "number", "positive number"):
        kind, low, high = domain
        if not _in_range(value, kind, low, high):
            bounds = f"in [{low}, {high}]" if high is not None else f"above {low}" if kind.startswith("pos") \
                else f">= {low}"
            article = "an" if kind == "integer" else "a"
            raise AdaPrunerError(f"fixed {name} must be {article} {kind} {bounds}, got {value!r}")
    elif value not in domain:
        raise AdaPrunerError(f"fixed {name} must be one of {', '.join(domain)}, got {value!r}")


@dataclass(frozen=True)
class SearchSpace:
    """What a search may vary, and over which ranges: importance metrics and their mixture, the
    calibration subset, the allocation across layers and modules, depth, and the repair (see the module docstring)."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    scores: tuple[str, ...] = SCORES  # importance searched: the mixture of metrics, FLAP's score (one: fixed)
    aggregations: tuple[str, ...] = AGGREGATIONS
    subset_mode: str = "clusters"  # how a trial's calibration subset is chosen: see SUBSET_MODES
    subset_size: tuple[int, int] = (4, 32)
    n_clusters: int = 8
    attn_share: bool = True  # search it; else the attention's proportional share
    scopes: tuple[str, ...] = SCOPES  # allocation scopes searched (one: fixed)
    repairs: tuple[str, ...] = ("off", "bias", "pool")  # repair modes searched (one: fixed)
    ridge: tuple[float, float] = (1e-3, 10.0)  # range of the repair's ridge, searched on a log scale
    depth: bool = True  # search how many whole layers to drop (0 .. n_layers // 4, as far as the target pays)
    iterations: tuple[int, int] = (1, 4)  # steps FLAP's score builds the plan in (one: not searched)
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown or not self.metrics:
            raise AdaPrunerError(f"unknown search metric {unknown[0] if unknown else None!r} "
                                 f"(choose from {', '.join(METRICS)})")
        bad = sorted(set(self.scores) - set(SCORES))
        if bad or not self.scores:
            raise AdaPrunerError(f"unknown score {bad[0] if bad else None!r} (choose from {', '.join(SCORES)})")
        bad = sorted(set(self.aggregations) - set(AGGREGATIONS))
        if bad or not self.aggregations:
            raise AdaPrunerError(f"unknown aggregation {bad[0] if bad else None!r}")
        if self.subset_mode not in SUBSET_MODES:
            raise AdaPrunerError(f"unknown subset mode {self.subset_mode!r} "
                                 f"(choose from {', '.join(SUBSET_MODES)})")
        lo, hi = self.subset_size
        if not 1 <= lo <= hi:
            raise AdaPrunerError(f"subset_size must be 1 <= min <= max, got {self.subset_size}")
        if self.n_clusters < 1:
            raise AdaPrunerError("n_clusters must be at least 1")
        bad = sorted(set(self.scopes) - set(SCOPES))
        if bad or not self.scopes:
            raise AdaPrunerError(f"unknown allocation scope {bad[0] if bad else None!r} "
                                 f"(choose from {', '.join(SCOPES)})")
        bad = sorted(set(self.repairs) - set(REPAIR_MODES))
        if bad or not self.repairs:
            raise AdaPrunerError(f"unknown repair mode {bad[0] if bad else None!r} "
                                 f"(choose from {', '.join(REPAIR_MODES)})")
        lo, hi = self.ridge
        if not 0 < lo <= hi < float("inf"):
            raise AdaPrunerError(f"ridge must be 0 < min <= max, got {self.ridge}")
        lo, hi = self.iterations
        if isinstance(lo, bool) or isinstance(hi, bool) or not 1 <= lo <= hi:
            raise AdaPrunerError(f"iterations must be 1 <= min <= max, got {self.iterations}")
        for name, value in self.fixed.items():
            check_fixed(name, value, self.n_clusters)

    def to_dict(self) -> dict:
        return {**asdict(self), "fixed": dict(self.fixed)}

    def check_layers(self, n_layers: int) -> None:
        """Fixed layer ranges must leave a layer to prune in a model of ``n_layers`` (checked once the
        model is known, before any trial runs, so that no trial fails on it)."""
        first, last = self.fixed.get("layer_first", 0), self.fixed.get("layer_last", 0)
        if first + last >= n_layers:
            raise AdaPrunerError(f"fixed layer_first={first} and layer_last={last} leave no layer to prune in "
                                 f"a model of {n_layers} layers")
        if self.fixed.get("drop_layers", 0) >= n_layers:
            raise AdaPrunerError(f"fixed drop_layers={self.fixed['drop_layers']} would drop every layer of a "
                                 f"model of {n_layers} layers")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        data = {"subset_mode" if k == "calibration" else k: v for k, v in data.items()}  # its earlier name
        for key in ("metrics", "scores", "aggregations", "subset_size", "scopes", "repairs", "ridge", "iterations"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class PoolClusters:
    """Pool sample indices per cluster, each list ordered nearest-to-centroid first."""

    members: tuple[tuple[int, ...], ...]

    @property
    def pool_size(self) -> int:
        return sum(len(m) for m in self.members)


def cluster_pool(embedding: torch.Tensor, n_clusters: int, seed: int = 0, iterations: int = 50) -> PoolClusters:
    """k-means (k-means++ start, Lloyd iterations) on L2-normalised sample embeddings."""
    x = torch.nn.functional.normalize(embedding.double(), dim=1)
    n = x.shape[0]
    k = max(1, min(n_clusters, n))
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=generator)]
    while centroids.shape[0] < k:
        distance = torch.cdist(x, centroids).min(1).values.square()
        pick = torch.multinomial(distance / distance.sum(), 1, generator=generator) if distance.sum() > 0 else \
            torch.randint(n, (1,), generator=generator)
        centroids = torch.cat([centroids, x[pick]])
    for _ in range(iterations):
        assign = torch.cdist(x, centroids).argmin(1)
        moved = torch.stack([x[assign == c].mean(0) if (assign == c).any() else centroids[c] for c in range(k)])
        if torch.allclose(moved, centroids):
            break
        centroids = moved
    distance = torch.cdist(x, centroids)
    assign = distance.argmin(1)
    members = []
    for c in range(k):
        idx = (assign == c).nonzero().flatten()
        if idx.numel():
            members.append(tuple(int(i) for i in idx[distance[idx, c].argsort(stable=True)]))
    return PoolClusters(tuple(members))


def allocate(total: int, weights: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder), never above ``capacity``."""
    total = min(total, sum(capacity))
    counts = [0] * len(weights)
    open_ = [i for i, c in enumerate(capacity) if c > 0]
    while total > sum(counts) and open_:
        left = total - sum(counts)
        mass = sum(weights[i] for i in open_)
        share = {i: (weights[i] / mass if mass > 0 else 1 / len(open_)) * left for i in open_}
        floors = {i: min(int(share[i]), capacity[i] - counts[i]) for i in open_}
        for i, f in floors.items():
            counts[i] += f
        rest = total - sum(counts)
        for i in sorted(open_, key=lambda i: (-(share[i] - int(share[i])), i)):
            if rest == 0:
                break
            if counts[i] < capacity[i]:
                counts[i] += 1
                rest -= 1
        open_ = [i for i in open_ if counts[i] < capacity[i]]
    return counts


def subset_from_clusters(clusters: PoolClusters, weights: Sequence[float], k: int) -> tuple[int, ...]:
    counts = allocate(k, weights, [len(m) for m in clusters.members])
    return tuple(sorted(i for members, n in zip(clusters.members, counts, strict=True) for i in members[:n]))


class _Params:
    """Suggest a parameter unless the space fixes it."""

    def __init__(self, trial: optuna.Trial, fixed: Mapping[str, Any]):
        self.trial, self.fixed = trial, fixed

    def float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return self.fixed[name] if name in self.fixed else self.trial.suggest_float(name, low, high, log=log)

    def int(self, name: str, low: int, high: int) -> int:
        return self.fixed[name] if name in self.fixed else self.trial.suggest_int(name, low, high)

    def categorical(self, name: str, choices: Sequence[Any]) -> Any:
        if name in self.fixed:
            return self.fixed[name]
        return choices[0] if len(choices) == 1 else self.trial.suggest_categorical(name, list(choices))


def suggest_config(trial: optuna.Trial, space: SearchSpace, clusters: PoolClusters, n_layers: int,
                   seed: int = 0, max_drop: int | None = None, min_drop: int = 0) -> PruneConfig:
    """The :class:`PruneConfig` of one trial; whole layers dropped from ``min_drop`` to ``max_drop`` (default: a
    quarter of them; the caller caps it at what the target pays for) when the space searches depth."""
    p = _Params(trial, space.fixed)
    pool_size = clusters.pool_size
    if space.subset_mode == "all":
        subset = tuple(range(pool_size))
    else:
        lo, hi = (min(v, pool_size) for v in space.subset_size)
        k = p.int("calib_size", lo, hi)
        if space.subset_mode == "random":
            generator = torch.Generator().manual_seed(p.int("calib_seed", 0, 2**20))
            subset = tuple(sorted(torch.randperm(pool_size, generator=generator)[:k].tolist()))
        else:
            weights = [p.float(cluster_weight(c), 0.0, 1.0) for c in range(len(clusters.members))]
            subset = subset_from_clusters(clusters, weights, k)
    weights = {m: 1.0 for m in space.metrics}
    if len(space.metrics) > 1:
        weights = {m: p.float(f"w_{m}", 0.0, 1.0) for m in space.metrics}
        if not any(w > 0 for w in weights.values()):  # all-zero weights mean "no preference"
            weights = {m: 1.0 for m in space.metrics}
    aggregation = p.categorical("aggregation", space.aggregations)
    mixture = Mixture(weights, aggregation, seed)
    lo, hi = space.iterations
    # Searched wherever FLAP's score may be, whatever this trial's score (a flat space, as the ridge's below)
    may_iterate = space.fixed.get("score", "flap") == "flap" and "flap" in space.scores
    iterations = p.int("iterations", lo, hi) if (hi > lo and may_iterate) or "iterations" in space.fixed else lo
    if p.categorical("score", space.scores) == "flap":  # weights and aggregation are then not used
        mixture = Mixture.single("flap", aggregation, seed)
    else:
        iterations = 1  # the mixture is measured once (see the module docstring)
    drops = n_layers // 4 if max_drop is None else max_drop
    allocation = Allocation(
        first=p.int("layer_first", 0, n_layers // 4),
        last=-p.int("layer_last", 0, n_layers // 8),
        strength=p.float("strength", 0.0, 1.0),
        attn_share=p.float("attn_share", 0.0, 1.0) if space.attn_share else None,
        drop_layers=p.int("drop_layers", min(min_drop, drops), drops) if space.depth or "drop_layers" in space.fixed
        else 0,
        scope=p.categorical("scope", space.scopes),
    )
    mode = p.categorical("repair", space.repairs)
    # Searched whenever a ridge may matter, whatever this trial's mode: a flat space (no conditional
    # parameter) suits every sampler.
    ridged = ("pool", "sequential")
    may_repair = space.fixed.get("repair", "pool") in ridged and any(m in ridged for m in space.repairs)
    ridge = p.float("ridge", *space.ridge, log=True) if may_repair else Repair.ridge
    return PruneConfig(mixture, subset, allocation, Repair(mode, ridge), iterations)
