"""Bayesian-optimization search over calibration subsets, metric mixtures, layer allocation and repair.

The one door into the search: the CLI and the service import from here (tests/test_layering.py checks it).
A study's stored keys are named in :mod:`.record`; a job is :class:`SearchJob`; :func:`run_search` runs one
target, :func:`run_targets` several.
"""

from .artifacts import artifact_store
from .baselines import BASELINES, DEFAULT_BASELINES, baseline_config
from .best import GGUF_ARTIFACT, GGUF_NAME, best_trial, export_best
from .job import EXPORT_DTYPES, EXPORT_FORMATS, STARTS, SearchJob
from .lock import StudyLock
from .objective import Objective
from .record import FINISHED, StudyKey, TrialKey, baseline_of, draw_of, stored
from .report import (
    baseline_draws,
    baseline_trials,
    best_so_far,
    describe_config,
    finished_trials,
    load_line,
    margin_sentence,
    report_markdown,
    write_report,
)
from .samplers import ESTIMATING_SAMPLERS, PRUNERS, SAMPLERS, make_pruner, make_sampler
from .selection import record_selection, select
from .space import (
    DEFAULT_METRICS,
    SCORES,
    SUBSET_MODES,
    PoolClusters,
    SearchSpace,
    check_fixed,
    cluster_pool,
    suggest_config,
)
from .storage import (
    SQLITE_BUSY_SECONDS,
    STORAGE_ERRORS,
    close_storage,
    count_trials,
    fail_dead_trials,
    make_storage,
    use_wal,
)
from .study import SearchResult, create_study, open_session, run_search
from .targets import check_targets, run_targets, target_study_name, tradeoff_markdown, write_tradeoff_report

__all__ = [
    "BASELINES", "SUBSET_MODES", "FINISHED", "DEFAULT_BASELINES", "DEFAULT_METRICS", "ESTIMATING_SAMPLERS",
    "EXPORT_DTYPES", "EXPORT_FORMATS", "GGUF_ARTIFACT", "GGUF_NAME", "PRUNERS", "SAMPLERS", "SCORES",
    "SQLITE_BUSY_SECONDS", "STORAGE_ERRORS", "STARTS", "StudyKey", "TrialKey",
    "artifact_store", "baseline_of", "draw_of", "stored",
    "baseline_config", "baseline_draws", "baseline_trials", "best_so_far", "best_trial", "check_fixed", "check_targets",
    "close_storage",
    "cluster_pool", "count_trials", "create_study", "describe_config", "export_best", "fail_dead_trials",
    "finished_trials", "load_line", "make_pruner", "make_sampler", "make_storage", "margin_sentence", "Objective",
    "open_session", "PoolClusters", "record_selection", "report_markdown", "run_search", "run_targets", "SearchJob",
    "SearchResult", "SearchSpace", "select", "StudyLock", "suggest_config", "target_study_name",
    "tradeoff_markdown", "use_wal", "write_report", "write_tradeoff_report",
]
