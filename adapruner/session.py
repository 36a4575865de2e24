"""A pruning session: everything computed once per job and shared by all its prunings.

Model + texts -> calibration pool -> pool statistics and the repair's input moments (cached on disk) -> for
each :class:`PruneConfig`: importance -> plan -> pruned copy -> repair (:meth:`PruningSession.prune`, the one
place they are chained) -> perplexity. A search trial, a baseline, the export of the chosen trial and
``adapruner prune`` all go through it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from pathlib import Path

import torch
from torch import nn

from .cache import atomic_folder, cache_dir, load_layer_tensors, save_layer_tensors
from .data import DEFAULT_CALIBRATION, DEFAULT_SEQ_LEN, TextSource, check_heldout, load_source
from .data.windows import CalibrationPool, build_pool, eval_windows, pool_draws, sample_windows
from .device import default_channel_multiple
from .errors import AdaPrunerError, OnStep
from .evaluate import Perplexity, default_batch_size, perplexity
from .importance import EXACT_TAYLOR_DTYPES, GroupScores, Mixture, WeightSummary, flap_remeasured, subset_importance
from .models import load_model, model_fingerprint
from .plan import Allocation, PruningPlan, make_plan, params_to_remove, removal_counts
from .prune import prune_model
from .repair import (
    MOMENTS_VERSION,
    REPAIR_WINDOWS,
    InputMoments,
    Repair,
    collect_moments,
    repair_pruned,
    repair_sequential,
)
from .statistics import (
    EXACT_TAYLOR_VERSION,
    FORMAT_VERSION,
    PoolStatistics,
    check_subset,
    collect_statistics,
    input_variances,
    taylor_first_exact,
)
from .structure import ModelStructure, decoder_layers, layer_linears, model_structure
from .wanda_sp import wanda_sp_sequential

logger = logging.getLogger(__name__)


def _no_phase(name: str) -> AbstractContextManager:
    return nullcontext()


# Metrics an iterative plan (``PruneConfig.iterations`` > 1) re-measures on the partly pruned model: FLAP's score,
# from a forward pass alone (input variances and weight columns).
ITERATIVE_METRICS = ("flap",)


@dataclass(frozen=True)
class PruneConfig:
    """One structured-pruning configuration: what a search trial proposes and a baseline fixes.

    ``iterations`` > 1 builds the plan in that many steps, each removing an equal share of the target: after
    each, the model pruned (and repaired) so far is measured again on the subset's windows, and FLAP's score of
    what it still has ranks the next share (Adapt-Pruner's and iterative FLAP's argument: what matters changes
    as the model shrinks). Measured on text no study reports (docs/results.md): FLAP's global plan at 20% on
    SmolLM2-135M, Python docs perplexity 108.9 in one step, 77.8 in two, 66.3 in four; in the leave-one-source-out
    bench (seed 0) the search, validating in domain, chose one-step plans, and the held-out margins did not move."""

    mixture: Mixture
    subset: tuple[int, ...]
    allocation: Allocation = Allocation()
    repair: Repair = Repair()
    iterations: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise AdaPrunerError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if self.iterations > 1 and set(self.mixture.active) - set(ITERATIVE_METRICS):
            raise AdaPrunerError(f"iterations > 1 re-measure FLAP's score on the pruned model: use the metric "
                                 f"{' or '.join(ITERATIVE_METRICS)}, not {', '.join(self.mixture.active)}")

    def to_dict(self) -> dict:
        return {"mixture": {"weights": dict(self.mixture.weights), "aggregation": self.mixture.aggregation,
                            "seed": self.mixture.seed},
                "subset": list(self.subset), "allocation": asdict(self.allocation), "repair": asdict(self.repair),
                "iterations": self.iterations}

    @classmethod
    def from_dict(cls, data: dict) -> PruneConfig:
        # Configs stored before repair (or iterations) existed have none: they were not repaired (one step).
        return cls(Mixture(**data["mixture"]), tuple(data["subset"]), Allocation(**data["allocation"]),
                   Repair(**data.get("repair", {})), data.get("iterations", 1))


@dataclass
class PruningSession:
    """A model, its calibration pool and its evaluation texts, with what is derived from them.

    Build one with :meth:`open` from names, or directly from objects (tests, notebooks).
    """

    model: nn.Module
    tokenizer: object
    pool: CalibrationPool
    eval_sources: Sequence[TextSource] = ()
    train_sources: Sequence[TextSource] = ()  # whose pool parts LoRA fine-tuning trains on
    heldout_sources: Sequence[TextSource] = ()  # scored on their test part only: out-of-domain test
    model_name: str = "model"
    max_eval_windows: int | dict[str, int | None] | None = 64  # per source; a dict sets each split
    batch_size: int | None = None
    cache_statistics: bool = True
    progress: bool = True
    channel_multiple: int | None = None  # kept MLP channels per layer step; None: the device's default
    repair_windows: int = REPAIR_WINDOWS  # windows of each calibration source's pool part for the repair's moments
    means_alone: bool = True  # the bias repair measures the means alone (False: a job that will regress anyway)
    on_step: OnStep | None = None  # told of each step of long work; may raise Stopped (see adapruner.errors)
    _windows: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)
    _exact: dict[tuple[str, tuple[int, ...]], dict] = field(default_factory=dict, repr=False)
    _scored: dict[tuple, GroupScores] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls,
        model: str,
        calibration: Sequence[str] = DEFAULT_CALIBRATION,
        evaluation: Sequence[str] | None = None,
        *,
        pool_size: int = 64,
        seq_len: int = DEFAULT_SEQ_LEN,
        seed: int = 0,
        device: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        max_eval_windows: int | dict[str, int | None] | None = 64,
        heldout: Sequence[str] | None = None,
        **options,
    ) -> PruningSession:
        """Load ``model`` and texts. ``calibration`` specs may carry a count (``builtin:books:10``);
        those without share the rest of ``pool_size``. Evaluation defaults to the calibration sources;
        ``heldout`` (test only) to the built-in sources that neither calibrate nor validate
        (see :func:`~adapruner.data.default_heldout`)."""
        draws = pool_draws(calibration, pool_size)
        sources = {spec: load_source(spec) for spec, _ in draws}  # bad text fails before the slow model load
        evaluation = list(evaluation) if evaluation else list(sources)
        eval_sources = [sources.get(spec) or load_source(spec) for spec in evaluation]
        heldout = check_heldout([*sources, *evaluation], heldout)
        heldout_sources = [load_source(spec) for spec in heldout]
        on_step = options.get("on_step")
        if on_step is not None:
            on_step("loading model", 0, 1)
        net, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        if on_step is not None:
            on_step("loading model", 1, 1)
        pool = build_pool(tokenizer, [(sources[spec], n) for spec, n in draws], seq_len, seed)
        return cls(net, tokenizer, pool, eval_sources, list(sources.values()), heldout_sources, model_name=model,
                   max_eval_windows=max_eval_windows, **options)

    # -- derived once --------------------------------------------------------------------------
    @cached_property
    def structure(self) -> ModelStructure:
        return model_structure(self.model)

    @cached_property
    def channel_step(self) -> int:
        """Kept MLP channels per layer in multiples of this (see :mod:`adapruner.plan`)."""
        if self.channel_multiple is not None:
            return self.channel_multiple
        return default_channel_multiple(next(self.model.parameters()).device)

    @cached_property
    def weight_summary(self) -> WeightSummary:
        """Weight-only unit statistics of the unpruned model, computed once (the model is never modified)."""
        return WeightSummary.of(self.model)

    @cached_property
    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    @property
    def statistics_path(self) -> Path:
        return self._cache_path("statistics", f"-v{FORMAT_VERSION}")

    @cached_property
    def statistics(self) -> PoolStatistics:
        """Per-sample statistics of the pool: loaded from the cache, or computed and cached."""
        path = self.statistics_path
        if self.cache_statistics and path.is_file():
            logger.info("pool statistics from cache %s", path)
            return PoolStatistics.load(path)
        stats = collect_statistics(self.model, self.pool.windows, progress=self.progress, on_step=self.on_step)
        stats.meta |= {"model": self.model_name, "pool": self.pool.content_hash}
        if self.cache_statistics:
            stats.save(path)
            return PoolStatistics.load(path)  # memory-mapped: the rows a trial reads, not the whole table
        return stats

    def _cache_path(self, kind: str, suffix: str = "") -> Path:
        return cache_dir(kind) / f"{self.fingerprint}-{self.pool.content_hash[:16]}{suffix}.safetensors"

    @cached_property
    def repair_pool(self) -> torch.Tensor:
        """The windows the repair's input moments come from: up to :attr:`repair_windows` of each calibration
        source's pool part, far more tokens than a trial's calibration subset, and never what validation or
        test read (a session built without its sources falls back on the calibration pool itself)."""
        if not self.train_sources:
            return self.pool.windows
        # One draw per set of sources, whatever the job's seed: the moments are computed (and cached) once.
        return sample_windows(self.tokenizer, self.train_sources, self.pool.seq_len, self.repair_windows, seed=0)

    @cached_property
    def moments(self) -> InputMoments:
        """Mean and covariance of every o_proj/down_proj input over :attr:`repair_pool` (unpruned model): loaded
        from the cache, or measured in one forward pass and cached, a group of layers at a time. Kept apart from
        the statistics, so that a job that never repairs never holds them; cached, they are memory-mapped from the
        cache's folder (see :mod:`adapruner.repair` for their size)."""
        return self._input_moments(covariance=True)

    @cached_property
    def means(self) -> InputMoments:
        """The same inputs' means alone (all the ``bias`` repair reads): :attr:`moments` where they are measured or
        cached already or where the job will need them anyway (not :attr:`means_alone`), else measured without the
        covariances (a fraction of the time, none of the memory)."""
        if (not self.means_alone or "moments" in self.__dict__
                or (self.cache_statistics and self._moments_folder(True).is_dir())):
            return self.moments
        return self._input_moments(covariance=False)

    def _moments_folder(self, covariance: bool) -> Path:
        digest = hashlib.sha256(self.repair_pool.numpy().tobytes()).hexdigest()[:16]
        return cache_dir("moments") / f"{self.fingerprint}-{digest}-m{MOMENTS_VERSION}{'' if covariance else '-means'}"

    def _input_moments(self, covariance: bool) -> InputMoments:
        collect = partial(collect_moments, self.model, self.repair_pool, progress=self.progress, on_step=self.on_step,
                          covariance=covariance)
        if not self.cache_statistics:
            return collect()
        folder = self._moments_folder(covariance)
        if not folder.is_dir():
            with atomic_folder(folder) as partial_folder:
                collect(folder=partial_folder)
        else:
            logger.info("repair moments from cache %s", folder)
        return InputMoments.load(folder)

    def exact_taylor(self, metric: str, subset: Sequence[int]) -> dict[tuple[int, str], torch.Tensor]:
        """LLM-Pruner's exact Taylor unit scores of ``subset`` (a backward pass, in float16 for
        ``llm_pruner``): computed once per subset and cached on disk, as a study's baseline is the same
        every time it is rebuilt."""
        subset = tuple(int(i) for i in check_subset(subset, len(self.pool)))
        key = (metric, subset)
        if key not in self._exact:
            dtype = EXACT_TAYLOR_DTYPES[metric]
            digest = hashlib.sha256(repr((metric, str(dtype), subset, EXACT_TAYLOR_VERSION)).encode()).hexdigest()[:16]
            path = self._cache_path("taylor", f"-{digest}")
            if self.cache_statistics and path.is_file():
                scores = load_layer_tensors(path)
            else:
                scores = taylor_first_exact(self.model, self.pool.windows[list(subset)], dtype=dtype)
                if self.cache_statistics:
                    save_layer_tensors(scores, path)
            self._exact[key] = scores
        return self._exact[key]

    def source_windows(self, source: TextSource, split: str) -> torch.Tensor:
        """Windows of one source's ``split`` (at most ``max_eval_windows``), tokenised once per session.

        ``selection`` is a second, larger draw of the validation part: its first windows are validation's,
        then as many more as ``max_eval_windows["selection"]`` allows (:mod:`adapruner.search.selection`)."""
        key = (source.name, split)
        if key not in self._windows:
            limit = self.max_eval_windows
            limit = limit.get(split) if isinstance(limit, dict) else limit
            part = "validation" if split == "selection" else split
            self._windows[key] = eval_windows(self.tokenizer, source, part, self.pool.seq_len, limit)
        return self._windows[key]

    def windows(self, split: str) -> torch.Tensor:
        """Evaluation windows of ``split`` over all evaluation sources, source after source."""
        if not self.eval_sources:
            raise ValueError("this session has no evaluation sources")
        return torch.cat([self.source_windows(source, split) for source in self.eval_sources])

    def window_sources(self, split: str) -> tuple[str, ...]:
        """The source name of each row of :meth:`windows` ``(split)``."""
        return tuple(source.name for source in self.eval_sources
                     for _ in range(self.source_windows(source, split).shape[0]))

    # -- one pruning ------------------------------------------------------------------------------
    def importance(self, config: PruneConfig, target: float | int | None = None) -> GroupScores:
        """Group scores of ``config``'s mixture on its subset; ``target`` only for a metric scored with its
        plan (:data:`~adapruner.importance.PLAN_DEPENDENT`)."""
        if config.mixture.plan_dependent:
            return self._scored_with_plan(config, target)
        stats = self.statistics if config.mixture.needs_data else None
        exact = {m: self.exact_taylor(m, config.subset) for m in config.mixture.active if m in EXACT_TAYLOR_DTYPES}
        scores = subset_importance(self.model, self.structure.layers, config.mixture, config.subset, stats,
                                   self.pool.windows, self.weight_summary, exact)
        single = len(config.mixture.active) == 1 and "flap" not in config.mixture.active
        if config.allocation.scope == "global" and single:
            return scores.normalised()  # one ranking of every unit needs one scale (a mixture is on one already)
        return scores

    def _scored_with_plan(self, config: PruneConfig, target: float | int | None) -> GroupScores:
        """Wanda-sp layer by layer as FLAP computes it (:mod:`adapruner.wanda_sp`): once per subset and counts."""
        if target is None:
            raise AdaPrunerError(f"metric {config.mixture.plan_dependent!r} needs the pruning target")
        _, counts = removal_counts(self.structure, target, config.allocation, self._layer_cos(config),
                                   self.channel_step)
        key = (config.mixture.plan_dependent, tuple(config.subset), tuple(counts))
        if key not in self._scored:
            windows = self.pool.windows[check_subset(config.subset, len(self.pool))]
            self._scored[key] = wanda_sp_sequential(self.model, self.structure.layers, windows, counts)
        return self._scored[key]

    def _layer_cos(self, config: PruneConfig) -> torch.Tensor | None:
        if not config.allocation.needs_layer_cos:
            return None
        return self.statistics.subset(config.subset).layer_cos

    def plan(self, config: PruneConfig, target: float | int, scores: GroupScores | None = None) -> PruningPlan:
        scores = scores if scores is not None else self.importance(config, target)
        return make_plan(self.structure, scores, target, config.allocation, self._layer_cos(config), self.channel_step)

    def prune(self, config: PruneConfig, target: float | int, share_unchanged: bool = False,
              phase: Callable[[str], AbstractContextManager] = _no_phase) -> tuple[nn.Module, PruningPlan]:
        """The one pruning pipeline: importance -> plan -> pruned copy -> repair, for a search trial, a baseline,
        an export and ``adapruner prune`` alike. ``share_unchanged``: the copy shares every tensor the plan does
        not cut with the session's model (a trial's copy, scored and dropped; see
        :func:`~adapruner.prune.prune_model`); ``phase(name)``: a context manager around each step (the search
        times them)."""
        pruned, plan = None, None
        for step in range(1, config.iterations + 1):  # one step, unless the config prunes iteratively
            with phase("importance"):
                scores = self.importance(config, target) if plan is None else self.remeasured(config, plan, pruned)
            with phase("plan"):
                plan = self.plan(config, self._step_target(config, target, step), scores)
            with phase("prune"):
                pruned = prune_model(self.model, plan, share_unchanged=share_unchanged)
            if config.repair.enabled:
                with phase("repair"):
                    pruned = self.repair(pruned, plan, config.repair)
        return pruned, plan

    def _step_target(self, config: PruneConfig, target: float | int, step: int) -> float | int:
        """What step ``step`` of ``config.iterations`` removes in all: the dropped layers from the first step on,
        then an equal share of the rest at each step (the last step: ``target`` itself)."""
        if step == config.iterations:
            return target
        dropped = config.allocation.dropped(len(self.structure.layers), self._layer_cos(config))
        depth = sum(self.structure.layers[i].params for i in dropped)
        return depth + round((params_to_remove(self.structure, target) - depth) * step / config.iterations)

    def remeasured(self, config: PruneConfig, plan: PruningPlan, pruned: nn.Module) -> GroupScores:
        """FLAP's scores of what ``pruned`` (``plan`` applied, and repaired) still has, measured on it over the
        config's subset (:func:`~adapruner.importance.flap_remeasured`): the next step of an iterative plan."""
        windows = self.pool.windows[check_subset(config.subset, len(self.pool))]
        variance = input_variances(pruned, windows)
        layers = decoder_layers(pruned)
        fluctuation = {(i, m): variance[(p, m)] * layer_linears(layers[p])[m].weight.detach().float().square().sum(0)
                       .cpu() for p, i in enumerate(plan.kept_layers) for m in ("o_proj", "down_proj")}
        return flap_remeasured(self.structure.layers, [lp.keep_groups for lp in plan.layers],
                               [lp.keep_channels for lp in plan.layers], fluctuation)

    def repair(self, pruned: nn.Module, plan: PruningPlan, repair: Repair) -> nn.Module:
        """Re-fit ``pruned``'s cut projections as ``repair`` says (in place; see :mod:`adapruner.repair`)."""
        if repair.mode in ("bias", "pool"):
            return repair_pruned(pruned, self.model, plan, self.moments if repair.mode == "pool" else self.means,
                                 repair)
        if repair.mode == "sequential":
            return repair_sequential(pruned, self.model, plan, self.pool.windows, repair.ridge)
        return pruned

    def perplexity(self, model: nn.Module, split: str, desc: str | None = None) -> Perplexity:
        size = self.batch_size or default_batch_size(self.pool.seq_len)
        return perplexity(model, self.windows(split), size, progress=self.progress, desc=desc or split)

    def random_subset(self, k: int, seed: int = 0) -> tuple[int, ...]:
        """``k`` pool samples drawn uniformly (LLM-Pruner's calibration: random samples)."""
        if not 1 <= k <= len(self.pool):
            raise ValueError(f"cannot draw {k} samples from a pool of {len(self.pool)}")
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(self.pool), generator=generator)[:k]
        return tuple(int(i) for i in check_subset(sorted(chosen.tolist()), len(self.pool)))
