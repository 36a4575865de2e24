"""Optuna samplers and pruners by name."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from ..errors import AdaPrunerError
from .record import TrialKey, meets_floor

SAMPLERS = ("tpe", "gp", "botorch", "random", "qmc")
PRUNERS = ("wilcoxon", "median", "sha", "hyperband", "none")
# Samplers that learn only from completed trials: a trial stopped early completes with an estimate.
ESTIMATING_SAMPLERS = ("gp", "botorch")


@contextlib.contextmanager
def chosen_experimental_features():
    """Silence Optuna's ExperimentalWarning for the features we use on purpose (heartbeats and their
    retry callback, TPE's ``group``, the Wilcoxon pruner), so users see only warnings that are news."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class _SearchedTrials:
    """A study as a sampler should see it: the baseline trials left out, everything else as it is."""

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name):
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if TrialKey.BASELINE not in t.user_attrs]

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number`` of a study seeded with ``seed``: distinct per trial, the same every run."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class BaselinesHidden(optuna.samplers.BaseSampler):
    """Wraps a sampler so that it learns from the searched trials only, never from the baselines.

    A baseline is a fixed configuration from outside the search space, recorded with no parameters.
    GP and BoTorch model the intersection of the completed trials' spaces, and QMC takes its space
    from the first completed trial: a baseline makes that space empty, and they would fall back,
    silently, to independent random sampling for the whole study.

    With ``reseed`` (a factory taking a seed), the sampler is rebuilt before every trial with a seed
    drawn from the job's seed and the trial's number. Several processes on one study each build
    their sampler from the same job seed: seeded once, they would all draw the same random start-up
    configurations (and, on equal history, the same proposals), and mostly repeat each other's work.
    Trial numbers are unique within a study, so no two trials share a seed, and a run by one process
    is still reproducible. The samplers keep nothing else between trials: they read the history from
    the study.
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler,
                 reseed: Callable[[int], optuna.samplers.BaseSampler] | None = None, seed: int = 0):
        self.sampler, self._reseed, self._seed = sampler, reseed, seed

    def __str__(self) -> str:
        return f"{type(self.sampler).__name__} (baselines hidden)"

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(_SearchedTrials(study), trial)

    def sample_relative(self, study, trial, search_space):
        return self.sampler.sample_relative(_SearchedTrials(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(_SearchedTrials(study), trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        if self._reseed is not None:
            self.sampler = self._reseed(trial_seed(self._seed, trial.number))
        self.sampler.before_trial(_SearchedTrials(study), trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(_SearchedTrials(study), trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def make_sampler(name: str, seed: int = 0, n_startup_trials: int = 8) -> optuna.samplers.BaseSampler:
    """The named sampler, wrapped so that the study's baseline trials do not shape its search, and
    seeded per trial so that processes sharing the study do not repeat each other (QMC excepted: its
    processes already share one sequence through the study and take distinct points of it)."""

    def build(trial_seed: int) -> optuna.samplers.BaseSampler:
        with chosen_experimental_features():
            return _make_sampler(name, trial_seed, n_startup_trials)

    return BaselinesHidden(build(seed), reseed=None if name == "qmc" else build, seed=seed)


def _make_sampler(name: str, seed: int, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # group + multivariate model the joint space; constant_liar keeps parallel workers apart.
        return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                          n_startup_trials=n_startup_trials)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "botorch":
        try:
            import botorch  # noqa: F401
            from optuna_integration import BoTorchSampler
        except ImportError:
            raise AdaPrunerError("the botorch sampler needs: pip install 'adapruner[botorch]'") from None
        return BoTorchSampler(seed=seed, n_startup_trials=n_startup_trials)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
    raise AdaPrunerError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")


def make_pruner(name: str, n_windows: int, min_speedup: float | None = None) -> optuna.pruners.BasePruner:
    """A pruner for trials that report one loss per validation window (step = window index).

    ``wilcoxon`` pairs each window's loss with the best trial's loss on the same window and stops a
    trial once it is significantly worse; the others compare running means, which is what they
    expect, so the objective reports those to them instead. With a speed-up floor, a trial is compared only
    with the trials that meet it (:class:`FloorPruner`).
    """
    with chosen_experimental_features():
        pruner = _make_pruner(name, n_windows)
    return pruner if min_speedup is None else FloorPruner(pruner, min_speedup)


class _TrialsMeetingFloor(_SearchedTrials):
    """A study as a pruner should see it under a speed-up floor: the trials predicted to meet it, and the best
    of them (a baseline or a shallow trial below the floor is no yardstick for the models that may be chosen)."""

    def __init__(self, study: optuna.Study, min_speedup: float):
        super().__init__(study)
        self._min_speedup = min_speedup

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if meets_floor(t, self._min_speedup)]

    @property
    def best_trial(self) -> FrozenTrial:
        complete = [t for t in self.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                    if t.value is not None]
        if not complete:
            raise ValueError("no completed trial meets the speed-up floor yet")
        return min(complete, key=lambda t: t.value)


class FloorPruner(optuna.pruners.BasePruner):
    """Wraps a pruner so that it judges a trial against the trials that meet the speed-up floor only."""

    def __init__(self, pruner: optuna.pruners.BasePruner, min_speedup: float):
        self.pruner, self.min_speedup = pruner, min_speedup

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.pruner.prune(_TrialsMeetingFloor(study, self.min_speedup), trial)  # type: ignore[arg-type]


def _make_pruner(name: str, n_windows: int) -> optuna.pruners.BasePruner:
    if name == "wilcoxon":
        # At least 6 paired windows: with fewer, the exact test cannot reach a small p-value, and
        # "worse on the first 4 windows" alone would stop a trial.
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=6)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=4)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(2, n_windows // 8), reduction_factor=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(2, n_windows // 8), max_resource=n_windows,
                                              reduction_factor=2)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise AdaPrunerError(f"unknown pruner {name!r} (choose from {', '.join(PRUNERS)})")


def reports_running_mean(pruner_name: str) -> bool:
    return pruner_name not in ("wilcoxon", "none")
