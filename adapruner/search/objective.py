"""One trial: params -> importance from cached statistics -> plan -> pruned copy -> validation perplexity.

The validation windows are visited in one fixed shuffled order and each window's perplexity is
reported (in the objective's unit, so the dashboard plots both on one axis), so Optuna's pruner can
stop a bad trial after a few windows. The validation perplexity is the exp of
the per-source mean of each source's mean loss, so that no source dominates when validation mixes
kinds of text. A completed trial that becomes the best so far (and every baseline) is also scored on
the test windows of the evaluation sources (in-domain) and of the held-out sources (out-of-domain);
test perplexities are recorded, never optimised.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import optuna
import torch

from ..decode_time import DecodeTime
from ..device import release_memory
from ..evaluate import window_losses
from ..plan import PruningPlan, params_to_remove
from ..session import PruneConfig, PruningSession
from ..structure import ModelStructure
from .record import TrialKey, meets_floor, stored_sizes
from .space import PoolClusters, SearchSpace, suggest_config
from .speed import drop_range

logger = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """A pruned model's loss came out NaN or infinite: its trial fails with this reason."""


#: The unit of a trial's intermediate values. Studies made before it was recorded hold log-perplexity;
#: a study keeps the unit it started with, so its trials stay comparable with each other.
PERPLEXITY, LOG_PERPLEXITY = "perplexity", "log-perplexity"
#: What a trial's value is, as the study names it (Optuna Dashboard labels its axes with it): the pruned model's
#: perplexity on the validation windows; its intermediate values are the same over the windows scored so far.
METRIC_NAME = "validation perplexity"


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def source_weights(sources: Sequence[str]) -> list[float]:
    """Weight of each window in a per-source mean: ``1 / (sources x that source's windows)``."""
    counts = Counter(sources)
    return [1.0 / (len(counts) * counts[name]) for name in sources]


def weighted_mean(losses: Mapping[int, float], weights: Sequence[float]) -> float:
    """Mean of the windows' losses, weighted (and renormalised over the windows present)."""
    total = sum(weights[i] for i in losses)
    return sum(weights[i] * loss for i, loss in losses.items()) / total


def paired_estimate(evaluated: Mapping[int, float], best_losses: Mapping[int, float], best_ppl: float,
                    weights: Sequence[float] | None = None) -> float:
    """Perplexity a stopped trial would have reached on all windows, estimated from the windows it saw.

    The best trial's mean loss over all windows, plus this trial's mean paired difference on the windows
    it was evaluated on — not its own partial mean, which depends on how easy those windows happen
    to be. A trial stopped for being worse than the best is never reported as better than it.
    """
    shared = [i for i in evaluated if i in best_losses]
    if not shared or not best_losses:
        return math.inf
    weights = weights if weights is not None else [1.0] * (max(best_losses) + 1)
    full = weighted_mean(best_losses, weights)
    difference = weighted_mean({i: evaluated[i] - best_losses[i] for i in shared}, weights)
    return max(math.exp(full + difference), math.nextafter(best_ppl, math.inf))


def max_drop_layers(structure: ModelStructure, target: float | int) -> int:
    """How many whole layers (the smallest first) fit in the parameters ``target`` removes."""
    budget, fit = params_to_remove(structure, target), 0
    for params in sorted(layer.params for layer in structure.layers)[:-1]:  # one layer always stays
        if params > budget:
            break
        budget, fit = budget - params, fit + 1
    return fit


def mean_perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    losses = [nll for _, nll in window_losses(model, windows, batch_size)]
    return math.exp(sum(losses) / len(losses))


def test_scores(session: PruningSession, model: torch.nn.Module, batch_size: int = 4) -> dict:
    """Test perplexity of each evaluation source and each held-out source, and their summaries.

    ``test_ppl`` (in-domain) and ``heldout_ppl`` (out-of-domain) are geometric means over sources,
    the per-source mean of log-perplexity, as validation is.
    """
    in_domain = {s.name: mean_perplexity(model, session.source_windows(s, "test"), batch_size)
                 for s in session.eval_sources}
    scores = {TrialKey.TEST_PPL: geometric_mean(in_domain.values()), TrialKey.TEST_PPL_BY_SOURCE: in_domain}
    if session.heldout_sources:
        heldout = {s.name: mean_perplexity(model, session.source_windows(s, "test"), batch_size)
                   for s in session.heldout_sources}
        scores |= {TrialKey.HELDOUT_PPL: geometric_mean(heldout.values()), TrialKey.HELDOUT_PPL_BY_SOURCE: heldout}
    return scores


class Objective:
    """Callable for ``study.optimize``; returns the pruned model's validation perplexity."""

    def __init__(
        self,
        session: PruningSession,
        space: SearchSpace,
        clusters: PoolClusters,
        target: float | int,
        baselines: Mapping[tuple[str, int], PruneConfig],
        seed: int = 0,
        running_mean: bool = False,
        batch_size: int = 4,
        estimate_stopped: bool = False,
        intermediate_unit: str = PERPLEXITY,
        decode_time: DecodeTime | None = None,
        min_speedup: float | None = None,
    ):
        """``estimate_stopped``: a trial stopped early completes with :func:`paired_estimate` instead of
        being marked pruned (stopped early) — for samplers that learn only from completed trials (GP, BoTorch).
        ``intermediate_unit``: what :meth:`optuna.Trial.report` receives, :data:`PERPLEXITY` or
        :data:`LOG_PERPLEXITY` (a study begun before the unit was recorded). ``decode_time``: every trial's decode
        speed-up is predicted with it and recorded; ``min_speedup``: the floor a searched trial must be predicted
        to reach (:mod:`.speed`), else it stops before validation."""
        if intermediate_unit not in (PERPLEXITY, LOG_PERPLEXITY):
            raise ValueError(f"unknown intermediate unit {intermediate_unit!r}")
        self.intermediate_unit = intermediate_unit
        self.session, self.space, self.clusters = session, space, clusters
        self.target, self.baselines, self.seed = target, baselines, seed
        self.running_mean, self.batch_size = running_mean, batch_size
        self.estimate_stopped = estimate_stopped and not running_mean
        self.weights = source_weights(session.window_sources("validation"))
        n_val = len(self.weights)
        self.decode_time, self.min_speedup = decode_time, min_speedup
        n_layers = len(session.structure.layers)
        # whole layers a trial may drop: a quarter at most (half with a speed-up floor), as far as the target pays
        cap = n_layers // 2 if min_speedup is not None else n_layers // 4
        self.min_drop, self.max_drop = drop_range(session.structure, target,
                                                  min(max_drop_layers(session.structure, target), cap),
                                                  decode_time, min_speedup)
        # One fixed order for every trial, so early windows are a fair sample and losses pair up.
        self.order = torch.randperm(n_val, generator=torch.Generator().manual_seed(seed)).tolist()

    def config(self, trial: optuna.Trial) -> PruneConfig:
        baseline = trial.user_attrs.get(TrialKey.BASELINE)
        if baseline:
            return self.baselines[(baseline, trial.user_attrs.get(TrialKey.DRAW, 0))]
        return suggest_config(trial, self.space, self.clusters, len(self.session.structure.layers), self.seed,
                              self.max_drop, self.min_drop)

    def __call__(self, trial: optuna.Trial) -> float:
        seconds: dict[str, float] = {}

        @contextmanager
        def phase(name: str):
            start = time.perf_counter()
            try:
                yield
            finally:  # a trial stopped early (or failing) records the time it spent too
                seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - start, 3)
                trial.set_user_attr(TrialKey.SECONDS, seconds)

        try:
            with phase("importance"):  # a searched trial's configuration is suggested here: sampling counts too
                config = self.config(trial)
            pruned, plan = self.session.prune(config, self.target, share_unchanged=True, phase=phase)  # then dropped
            trial.set_user_attr(TrialKey.CONFIG, config.to_dict())
            # a repair's biases count too
            trial.set_user_attr(TrialKey.PARAMS_KEPT, sum(p.numel() for p in pruned.parameters()))
            trial.set_user_attr(TrialKey.REMOVED_SHARE, round(plan.removed_share, 6))
            trial.set_user_attr(TrialKey.SIZES, stored_sizes(plan.sizes()))
            trial.set_user_attr(TrialKey.DROPPED_LAYERS, list(plan.dropped))
            if self.decode_time is not None:
                self._check_speed(trial, plan)
            with phase("validation"):
                baseline = bool(trial.user_attrs.get(TrialKey.BASELINE))  # baselines are never stopped early
                val_nll, stopped = self._validate(trial, pruned, may_stop_early=not baseline)
            if stopped is not None:
                return stopped
            val_ppl = math.exp(val_nll)
            trial.set_user_attr(TrialKey.VAL_PPL, val_ppl)
            if trial.user_attrs.get(TrialKey.BASELINE) or self._is_new_best(trial, val_ppl):
                with phase("test"):
                    self._test(trial, pruned)
            return val_ppl
        except torch.OutOfMemoryError:  # this trial's copy did not fit: free it; the trial fails (see run_trial)
            pruned = None  # noqa: F841  (drop the reference before the cache is emptied)
            release_memory()
            raise

    def _validate(self, trial: optuna.Trial, model: torch.nn.Module,
                  may_stop_early: bool) -> tuple[float, float | None]:
        """(mean validation loss, None), or (partial mean, estimated ppl) for a trial stopped early."""
        windows = self.session.windows("validation")
        losses: dict[int, float] = {}
        for index, nll in window_losses(model, windows, self.batch_size, order=self.order):
            if not math.isfinite(nll):
                raise NonFiniteLoss(f"non-finite loss on validation window {index}")
            losses[index] = nll
            mean = weighted_mean(losses, self.weights)
            if self.running_mean:
                trial.report(self._in_unit(mean), step=len(losses))
            else:
                trial.report(self._in_unit(nll), step=index)
            # A trial that has seen every window is finished, not stopped: nothing is left to save.
            if may_stop_early and len(losses) < windows.shape[0] and trial.should_prune():
                trial.set_user_attr(TrialKey.WINDOWS, len(losses))
                trial.set_user_attr(TrialKey.PARTIAL_VAL_PPL, math.exp(mean))
                message = f"stopped after {len(losses)} of {windows.shape[0]} validation windows"
                if not self.estimate_stopped:
                    raise optuna.TrialPruned(message)
                best = trial.study.best_trial
                trial.set_user_attr(TrialKey.ESTIMATED, True)
                best_losses = {i: self._as_loss(v) for i, v in best.intermediate_values.items()}
                return mean, paired_estimate(losses, best_losses, best.value, self.weights)
        trial.set_user_attr(TrialKey.WINDOWS, len(losses))
        return weighted_mean(losses, self.weights), None

    def _in_unit(self, nll: float) -> float:
        return math.exp(nll) if self.intermediate_unit == PERPLEXITY else nll

    def _as_loss(self, value: float) -> float:
        return math.log(value) if self.intermediate_unit == PERPLEXITY else value

    def _test(self, trial: optuna.Trial, model: torch.nn.Module) -> None:
        for key, value in test_scores(self.session, model, self.batch_size).items():
            trial.set_user_attr(key, value)

    def _check_speed(self, trial: optuna.Trial, plan: PruningPlan) -> None:
        """Record the plan's predicted decode speed-up; stop a searched trial predicted below the floor."""
        speedup = round(self.decode_time.speedup_of(self.session.structure, plan), 4)  # as stored and compared later
        trial.set_user_attr(TrialKey.SPEEDUP, speedup)
        if self.min_speedup is not None and speedup < self.min_speedup and not trial.user_attrs.get(TrialKey.BASELINE):
            raise optuna.TrialPruned(f"predicted decode speed-up {speedup:.2f} is below the floor {self.min_speedup:g}")

    def _is_new_best(self, trial: optuna.Trial, value: float) -> bool:
        done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return all(value < t.value for t in done if t.value is not None and meets_floor(t, self.min_speedup))
