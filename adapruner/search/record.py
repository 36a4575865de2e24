"""What a study and its trials store, each key named once.

A study keeps everything the search learns in Optuna's user attributes: the job it runs, the data and the
unpruned model's scores, each trial's configuration, sizes and perplexities. Every module that reads or
writes them names the key through :class:`StudyKey` and :class:`TrialKey` (a test fails on a key written as
a literal anywhere else), and reads the few shapes that are easy to get wrong through the helpers below:
which trial is a baseline and of which draw, and which trials are finished.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna.trial import FrozenTrial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # trials whose work counts against the budget


class StudyKey:
    """A study's user attributes."""

    JOB = "job"  # the SearchJob's dict (SearchJob.to_dict)
    VERSION = "adapruner_version"  # the package version that created the study
    INTERMEDIATE_UNIT = "intermediate_unit"  # what a trial's intermediate values measure
    DATA = "data"  # the pool, the windows and the model's size, as the study measured them
    UNPRUNED = "unpruned"  # the unpruned model's perplexities
    INFORMED_START = "informed_start"  # how many informed trials were queued (once)
    SELECTION = "selection"  # the finalists re-scored on the selection windows, and the choice
    TASKS = "tasks"  # downstream accuracies of the unpruned, baseline and chosen models
    INFERENCE_COST = "inference_cost"  # measured speed and memory of the same models
    FINETUNE = "finetune"  # the chosen model's LoRA fine-tuning, when the job asks for one
    BEST_MODEL = "best_model"  # the exported model's trial and artifact
    DECODE_TIME = "decode_time"  # the decode-time model a speed-up floor is predicted with (measured once)


class TrialKey:
    """A trial's user attributes."""

    BASELINE = "baseline"  # the baseline's name; absent for searched trials
    DRAW = "draw"  # which calibration draw of a drawn baseline (0 when absent)
    CONFIG = "config"  # the PruneConfig's dict
    PARAMS_KEPT = "params_kept"
    REMOVED_SHARE = "removed_share"  # the share of all parameters the plan removes
    SIZES = "sizes"  # per layer: [KV groups, MLP channels]
    DROPPED_LAYERS = "dropped_layers"
    SPEEDUP = "predicted_speedup"  # decode tokens/s over the unpruned model's, predicted (jobs with a speed-up floor)
    VAL_PPL = "val_ppl"
    PARTIAL_VAL_PPL = "partial_val_ppl"  # the perplexity over the windows scored before it was stopped early
    WINDOWS = "windows"  # validation windows scored
    ESTIMATED = "estimated"  # its value is an estimate from fewer windows than the others'
    TEST_PPL = "test_ppl"
    HELDOUT_PPL = "heldout_ppl"
    TEST_PPL_BY_SOURCE = "test_ppl_by_source"
    HELDOUT_PPL_BY_SOURCE = "heldout_ppl_by_source"
    SELECTION_PPL = "selection_ppl"  # the perplexity on the selection windows, for finalists
    DRAWS = "draws"  # on a baseline's expected trial: each draw's scores
    SECONDS = "seconds"  # seconds per phase
    WORKER = "worker"  # the process running it: host:pid
    FAIL_REASON = "fail_reason"


# Keys that earlier versions stored under another name; :func:`stored` reads either, so their studies still show them.
LEGACY_KEYS = {StudyKey.UNPRUNED: "dense", StudyKey.FINETUNE: "recovery", TrialKey.REMOVED_SHARE: "ratio"}


def stored(attrs: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``attrs[key]``, or what an earlier version stored under the key's old name, else ``default``."""
    if key in attrs:
        return attrs[key]
    return attrs.get(LEGACY_KEYS.get(key), default)


def baseline_of(trial: FrozenTrial) -> str | None:
    """The baseline a trial runs, ``None`` for a searched trial."""
    return trial.user_attrs.get(TrialKey.BASELINE) or None


def draw_of(trial: FrozenTrial) -> int:
    """Which calibration draw of its baseline a trial is (0 for a baseline that draws nothing)."""
    return trial.user_attrs.get(TrialKey.DRAW, 0)


def baseline_attrs(name: str, draw: int) -> dict:
    """The user attributes that queue a baseline's draw."""
    return {TrialKey.BASELINE: name, TrialKey.DRAW: draw}


def stored_sizes(sizes: list[dict[str, int]]) -> list[list[int]]:
    """A plan's per-layer sizes (:meth:`~adapruner.plan.PruningPlan.sizes`) as a trial stores them
    (:attr:`TrialKey.SIZES`)."""
    return [[s["num_key_value_heads"], s["intermediate_size"]] for s in sizes]


def searched(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The searched trials (not the baselines), in order."""
    return [t for t in trials if baseline_of(t) is None]


def meets_floor(trial: FrozenTrial, min_speedup: float | None) -> bool:
    """Whether ``trial``'s model is predicted to decode at least ``min_speedup`` times as fast as the unpruned
    model (every trial does without a floor; see :mod:`~adapruner.search.speed`)."""
    return min_speedup is None or trial.user_attrs.get(TrialKey.SPEEDUP, 0.0) >= min_speedup
