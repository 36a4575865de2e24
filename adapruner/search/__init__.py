"""Bayesian-optimization search over calibration subsets, metric mixtures and layer allocation."""

from .baselines import BASELINES, DEFAULT_BASELINES, baseline_config
from .objective import Objective
from .samplers import PRUNERS, SAMPLERS, make_pruner, make_sampler
from .space import DEFAULT_METRICS, PoolClusters, SearchSpace, cluster_pool, suggest_config
from .study import SearchJob, SearchResult, create_study, export_best, make_storage, open_session, run_search

__all__ = [
    "BASELINES", "DEFAULT_BASELINES", "DEFAULT_METRICS", "PRUNERS", "SAMPLERS", "Objective", "PoolClusters",
    "SearchJob", "SearchResult", "SearchSpace", "baseline_config", "cluster_pool", "create_study", "export_best",
    "make_pruner", "make_sampler", "make_storage", "open_session", "run_search", "suggest_config",
]
