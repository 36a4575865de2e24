"""The first searched trials, informed instead of random.

The baselines are hidden from the sampler (they lie outside the search space, and some samplers would
fall back to random sampling for the whole study if they saw them). So TPE's first trials used to be its
random start-up, and a short search lost to LLM-Pruner. A study now also queues, as ordinary searched
trials that the sampler learns from (:data:`~.job.STARTS`):

1. **peers** — LLM-Pruner's and FLAP's own configurations expressed in the search space (closest
   decomposable metric, their layer ranges and structure, their repair), then each with the ``pool`` repair;
2. **priors** — configurations shipped with the package (``priors.json``: the best of searches on the
   built-in texts, each recorded with the sources it saw; how they were derived is in the file and in
   docs/results.md);
3. **warm** (``start="warm"``) — the chosen configuration of each earlier finished study in the same storage
   (the space is the same for every model: layer ranges are clamped to the model).

A prior's or an earlier study's calibration subset does not carry: its weights name clusters of that study's pool,
drawn and clustered with its own seed, so on this job's pool they pick an arbitrary subset. Such a configuration
starts with the peers' subset instead (even weights over this job's clusters, its seed), keeping its size.

A prior or an earlier study that calibrated or validated on any of this job's held-out sources is never
used: its configuration was tuned, in part, on what this job reports as unseen. TPE's random start-up
counts these trials among its start-up trials, so it shrinks accordingly.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from importlib import resources
from typing import Any

import optuna

from ..data import check_heldout, parse_draw
from ..session import PruningSession
from ..structure import ModelStructure
from .job import SearchJob
from .record import StudyKey, TrialKey
from .selection import chosen_trial
from .space import PoolClusters, cluster_index, cluster_weight, suggest_config

logger = logging.getLogger(__name__)

WARM_STUDIES = 4  # earlier studies a warm start takes one configuration from, the most recent first


class _Domains:
    """Stands in for a trial in :func:`~.space.suggest_config` and records each searched parameter's domain."""

    def __init__(self):
        self.domains: dict[str, tuple] = {}

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        self.domains[name] = ("float", low, high)
        return high

    def suggest_int(self, name: str, low: int, high: int) -> int:
        self.domains[name] = ("int", low, high)
        return low

    def suggest_categorical(self, name: str, choices: list) -> Any:
        self.domains[name] = ("categorical", tuple(choices))
        return choices[0]


def search_domains(job: SearchJob, clusters: PoolClusters, n_layers: int, max_drop: int,
                   min_drop: int = 0) -> dict[str, tuple]:
    """Each searched parameter of ``job``'s space on this model: ``("float" | "int", low, high)`` or
    ``("categorical", choices)``."""
    recorder = _Domains()
    suggest_config(recorder, job.space, clusters, n_layers, job.seed, max_drop, min_drop)  # type: ignore[arg-type]
    return recorder.domains


def fit_to_space(params: dict[str, Any], domains: dict[str, tuple]) -> dict[str, Any]:
    """``params`` restricted to the searched parameters, numbers clamped into their ranges; a categorical value
    the space does not offer is left out (the sampler then draws it)."""
    fitted = {}
    for name, value in params.items():
        domain = domains.get(name)
        if domain is None:
            continue
        if domain[0] == "categorical":
            if value in domain[1]:
                fitted[name] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            low, high = domain[1], domain[2]
            clamped = min(max(value, low), high)
            fitted[name] = int(round(clamped)) if domain[0] == "int" else float(clamped)
    return fitted


def _metric_weights(metric: str, metrics: tuple[str, ...]) -> dict[str, float]:
    return {f"w_{m}": 1.0 if m == metric else 0.0 for m in metrics}


def rule_ridge(job: SearchJob, structure: ModelStructure) -> float:
    """The repair ridge's rule ``λ = k / T`` (:mod:`adapruner.repair`) for the widest repaired projection kept
    whole: one number standing for the rule in a space that searches a single ``λ``."""
    widest = max(max(s.n_channels, s.n_groups * s.n_rep * s.head_dim) for s in structure.layers)
    return widest / (job.repair_windows * job.seq_len * len(job.calibration))


def even_subset(job: SearchJob, n_clusters: int) -> dict[str, Any]:
    """The subset every cluster of this job's pool shares evenly (its samples nearest their centroid first)."""
    return {"calib_seed": job.seed, **{cluster_weight(c): 1.0 for c in range(n_clusters)}}


def own_subset(params: dict[str, Any], job: SearchJob, n_clusters: int) -> dict[str, Any]:
    """``params`` from another study with this job's :func:`even_subset` in place of that study's subset
    composition (the subset's size carries)."""
    theirs = [name for name in params if name == "calib_seed" or cluster_index(name) is not None]
    if not theirs:
        return dict(params)
    return {**{k: v for k, v in params.items() if k not in theirs}, **even_subset(job, n_clusters)}


def peer_params(job: SearchJob, structure: ModelStructure, n_clusters: int) -> list[dict[str, Any]]:
    """LLM-Pruner's and FLAP's own configurations as points of the search space, each as its tool gives it and
    then with the ``pool`` repair (the ``llm-pruner+repair`` baseline's, ridge by its rule): the strongest
    baseline is then a point the sampler learns from, not only a hidden yardstick."""
    n_layers = len(structure.layers)
    shape = structure.layers[0]
    even = even_subset(job, n_clusters)
    llm_pruner = {
        "calib_size": 10, **even,
        **_metric_weights("taylor_first_persample", job.space.metrics),  # closest per-sample metric to its Taylor
        "score": "mixture", "aggregation": "sum", "layer_first": min(4, n_layers // 4),
        "layer_last": min(2, n_layers // 8),
        "strength": 0.0, "attn_share": shape.n_groups * shape.group_params / shape.prunable_params,
        "scope": "layer", "repair": "off", "drop_layers": 0, "iterations": 1,
    }
    flap = {
        "calib_size": job.space.subset_size[1], **even,
        **_metric_weights("flap_fluctuation", job.space.metrics), "score": "flap", "aggregation": "last",
        "layer_first": 0, "layer_last": 0, "strength": 0.0, "attn_share": 0.0, "scope": "global",
        "repair": "bias", "drop_layers": 0, "iterations": 1,
    }
    repaired = {"repair": "pool", "ridge": rule_ridge(job, structure)}
    return [llm_pruner, flap, {**llm_pruner, **repaired}, {**flap, **repaired}]


@cache
def shipped_priors() -> dict:
    """The priors shipped with the package (``adapruner/search/priors.json``)."""
    return json.loads(resources.files(__package__).joinpath("priors.json").read_text())


def _names(specs) -> set[str]:
    return {parse_draw(spec, 0)[0].strip() for spec in specs}


def seen_sources(job: SearchJob) -> set[str]:
    """The sources a job calibrates or validates on."""
    return _names([*job.calibration, *job.evaluation])


def unseen_sources(job: SearchJob) -> set[str]:
    """The job's held-out sources: what nothing that informs its start may have seen."""
    return _names(check_heldout([*job.calibration, *job.evaluation], job.heldout))


def prior_params(job: SearchJob) -> list[dict[str, Any]]:
    """The shipped priors that never saw one of the job's held-out sources."""
    unseen = unseen_sources(job)
    return [p["params"] for p in shipped_priors()["priors"] if not unseen & set(p["seen"])]


def warm_params(storage: optuna.storages.BaseStorage, job: SearchJob, study_name: str) -> list[dict[str, Any]]:
    """The chosen searched configuration of up to :data:`WARM_STUDIES` earlier finished studies in ``storage``,
    the most recent first, each of which never saw one of the job's held-out sources."""
    unseen = unseen_sources(job)
    summaries = [s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
                 if s.study_name != study_name and StudyKey.SELECTION in s.user_attrs and StudyKey.JOB in s.user_attrs]
    found = []
    for summary in sorted(summaries, key=lambda s: s.datetime_start or 0, reverse=True):
        if unseen & seen_sources(SearchJob.from_dict(summary.user_attrs[StudyKey.JOB])):
            continue
        chosen = chosen_trial(optuna.load_study(study_name=summary.study_name, storage=storage))
        if chosen is not None and chosen.params and not chosen.user_attrs.get(TrialKey.BASELINE):
            found.append(dict(chosen.params))
        if len(found) == WARM_STUDIES:
            break
    return found


def informed_params(job: SearchJob, session: PruningSession, clusters: PoolClusters, max_drop: int,
                    storage: optuna.storages.BaseStorage | None = None, study_name: str = "",
                    min_drop: int = 0) -> list[dict]:
    """The parameters of the trials a study starts with (peers, then priors, then earlier studies, those two with
    this job's own subset), fitted to the space (the layers they drop clamped to ``min_drop`` .. ``max_drop``),
    without repeats, at most ``job.trials``."""
    if job.start == "random":
        return []
    transferred = prior_params(job)
    if job.start == "warm" and storage is not None:
        transferred += warm_params(storage, job, study_name)
    n_clusters = len(clusters.members)
    candidates = peer_params(job, session.structure, n_clusters) + [own_subset(p, job, n_clusters)
                                                                      for p in transferred]
    domains = search_domains(job, clusters, len(session.structure.layers), max_drop, min_drop)
    queued: list[dict] = []
    for params in candidates:
        fitted = fit_to_space(params, domains)
        if fitted and fitted not in queued:
            queued.append(fitted)
    return queued[: job.trials]


def enqueue_informed(study: optuna.Study, job: SearchJob, session: PruningSession, clusters: PoolClusters,
                     max_drop: int, storage: optuna.storages.BaseStorage | None = None, min_drop: int = 0) -> None:
    """Queue the informed start once per study (call it holding the study lock)."""
    if StudyKey.INFORMED_START in study.user_attrs:
        return
    params = informed_params(job, session, clusters, max_drop, storage, study.study_name, min_drop)
    for p in params:
        study.enqueue_trial(p, skip_if_exists=True)
    study.set_user_attr(StudyKey.INFORMED_START, len(params))
    logger.info("study %s starts with %d informed trials", study.study_name, len(params))
