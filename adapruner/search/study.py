"""Run a search job as an Optuna study: any storage, resumable by name, shared by many processes.

A :class:`~adapruner.search.job.SearchJob` says everything that defines a search. :func:`run_search`
opens the study (creating it, with its baselines enqueued, or resuming it), then claims and runs trials
until the study holds ``job.trials`` finished (complete or stopped early) searched trials and one per
baseline run, however many processes share it; re-scores the finalists (:mod:`~adapruner.search.selection`);
finally it rebuilds the best configuration's pruned model, saves it and uploads it
as an Optuna artifact (:mod:`~adapruner.search.best`).

Heartbeats (RDB storages) mark the trial of a process that died as failed, and
``RetryHeartbeatStaleTrialCallback`` queues it again, so a killed worker loses nothing
(:mod:`~adapruner.search.storage`).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from .. import __version__
from ..device import release_memory
from ..errors import AdaPrunerError, OnStep
from ..evaluate import perplexity
from ..session import PruningSession
from .accuracy import score_tasks
from .baselines import baseline_config
from .best import best_trial, default_artifact_dir, export_best
from .cost import measure_models
from .job import SearchJob
from .lock import StudyLock
from .objective import LOG_PERPLEXITY, METRIC_NAME, PERPLEXITY, Objective, geometric_mean
from .record import StudyKey, TrialKey, baseline_attrs, baseline_of, draw_of
from .samplers import ESTIMATING_SAMPLERS, make_pruner, make_sampler, reports_running_mean
from .selection import record_selection
from .space import cluster_pool
from .speed import study_decode_time
from .start import enqueue_informed
from .storage import (
    STORAGE_ERRORS,
    Heartbeat,
    PatientTrial,
    count_trials,
    fail_dead_trials,
    finish_trial,
    make_storage,
    mark_alive,
)

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """A finished search: its study, the chosen trial, and where its exported model went."""

    study: optuna.Study
    best_trial: optuna.trial.FrozenTrial | None
    model_dir: Path | None
    artifact_id: str | None


def open_session(job: SearchJob, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, progress: bool = True,
                 on_step: OnStep | None = None) -> PruningSession:
    return PruningSession.open(
        job.model, job.calibration, job.evaluation or None, pool_size=job.pool_size, seq_len=job.seq_len,
        seed=job.seed, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        max_eval_windows={"validation": job.val_windows, "test": job.test_windows,
                          "selection": job.val_windows + job.selection_windows},
        progress=progress, heldout=job.heldout, on_step=on_step, channel_multiple=job.channel_multiple,
        repair_windows=job.repair_windows, means_alone=not job.regresses,
    )


def create_study(storage: optuna.storages.BaseStorage, name: str, job: SearchJob) -> optuna.Study:
    """Create the study with its spec and queued baselines; an existing study must have the same spec."""
    sampler = make_sampler(job.sampler, job.seed)
    pruner = make_pruner(job.pruner, job.val_windows, job.min_speedup)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                                    pruner=pruner, load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        stored, wanted = study.user_attrs.get(StudyKey.JOB), job.identity()
        # Read the stored job back through the dataclass, so fields added since it was stored take
        # their defaults and an older study still resumes.
        known = SearchJob.from_dict(stored).identity() if stored is not None else None
        if known is not None and known != wanted:
            changed = sorted(k for k in wanted if known.get(k) != wanted[k])
            raise AdaPrunerError(f"study {name!r} exists with a different job ({', '.join(changed)} differ); "
                                 "use another --study name") from None
        if stored is not None and stored.get("trials") != job.trials:
            study.set_user_attr(StudyKey.JOB, job.to_dict())  # the budget grew or shrank: record the new one
        return study
    # The unit first: a process that finds the study without it reads it as new (perplexity), and one
    # that finds the version without the unit has an older study (log-perplexity).
    study.set_user_attr(StudyKey.INTERMEDIATE_UNIT, PERPLEXITY)
    with warnings.catch_warnings():  # experimental in Optuna, and what the dashboard's axes are labelled with
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC_NAME])
    # Baselines first, before anyone else can ask for a trial.
    for name, draw in job.baseline_runs:
        study.enqueue_trial({}, user_attrs=baseline_attrs(name, draw))
    study.set_user_attr(StudyKey.JOB, job.to_dict())
    study.set_user_attr(StudyKey.VERSION, __version__)
    return study


def intermediate_unit(study: optuna.Study) -> str:
    """The unit of the study's intermediate values (see :data:`objective.PERPLEXITY`)."""
    attrs = study.user_attrs
    if StudyKey.INTERMEDIATE_UNIT in attrs:
        return attrs[StudyKey.INTERMEDIATE_UNIT]
    return LOG_PERPLEXITY if StudyKey.VERSION in attrs else PERPLEXITY


BASELINE_ATTEMPTS = 3


def requeue_failed_baselines(study: optuna.Study, job: SearchJob) -> None:
    """Queue a baseline run again whose every trial failed (a storage error, say), up to BASELINE_ATTEMPTS
    trials in all: the report exists for the comparison with it. Call it holding the study lock."""
    trials = study.get_trials(deepcopy=False)
    for name, draw in job.baseline_runs:
        attempts = [t for t in trials if baseline_of(t) == name and draw_of(t) == draw]
        if attempts and len(attempts) < BASELINE_ATTEMPTS and all(t.state == TrialState.FAIL for t in attempts):
            logger.warning("baseline %s (draw %d) failed (%s): queued again", name, draw,
                           attempts[-1].user_attrs.get(TrialKey.FAIL_REASON))
            study.enqueue_trial({}, user_attrs=baseline_attrs(name, draw))


def describe_data(study: optuna.Study, session: PruningSession) -> None:
    """Record the texts' content hashes and the unpruned model's perplexities with the study (once)."""
    if StudyKey.UNPRUNED in study.user_attrs:
        return
    study.set_user_attr(StudyKey.DATA, {
        "pool_hash": session.pool.content_hash,
        "pool_sources": sorted(set(session.pool.source_of)),
        "sources": {s.name: s.hashes for s in session.eval_sources},
        "heldout_sources": {s.name: s.hashes["test"] for s in session.heldout_sources},
        "splits": {s.name: s.split_description for s in [*session.eval_sources, *session.heldout_sources]},
        "val_windows": int(session.windows("validation").shape[0]),
        "test_windows": int(session.windows("test").shape[0]),
        "params": session.structure.total_params,
    })

    def ppl(source, split):
        return perplexity(session.model, session.source_windows(source, split), progress=session.progress,
                          desc=f"unpruned {source.name} {split}").ppl

    # Per-source geometric means, as the objective scores trials.
    by_source = {split: {s.name: ppl(s, split) for s in session.eval_sources} for split in ("validation", "test")}
    unpruned = {split: geometric_mean(table.values()) for split, table in by_source.items()}
    unpruned["test_by_source"] = by_source["test"]
    heldout = {s.name: ppl(s, "test") for s in session.heldout_sources}
    if heldout:
        unpruned["heldout"] = geometric_mean(heldout.values())
        unpruned["heldout_by_source"] = heldout
    study.set_user_attr(StudyKey.UNPRUNED, unpruned)


def run_search(
    job: SearchJob,
    storage_url: str | None,
    study_name: str | None = None,
    *,
    session: PruningSession | None = None,
    device: str | None = None,
    dtype: str | None = None,
    out_dir: str | Path | None = None,
    artifact_dir: str | Path | None = None,  # a folder or s3://BUCKET
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    poll_seconds: float = 5.0,
    storage: optuna.storages.BaseStorage | None = None,
) -> SearchResult:
    """Run (or join, or resume) the study until it holds ``job.total_trials`` finished trials."""
    storage = storage or make_storage(storage_url)
    name = study_name or job.default_study_name
    study = create_study(storage, name, job)
    session = session or open_session(job, device, dtype, progress=progress)
    job.space.check_layers(len(session.structure.layers))
    if session.on_step is not None:
        session.on_step("unpruned perplexity", 0, 1)
    describe_data(study, session)
    clusters = cluster_pool(session.statistics.embedding, job.space.n_clusters, job.seed)
    baselines = {(name, draw): baseline_config(name, session, job.seed, draw, job.target)
                 for name, draw in job.baseline_runs}
    lock = StudyLock(storage_url, name)
    decode_time = study_decode_time(study, session, job, lock)
    objective = Objective(session, job.space, clusters, job.target, baselines, job.seed,
                          running_mean=reports_running_mean(job.pruner),
                          estimate_stopped=job.sampler in ESTIMATING_SAMPLERS,
                          intermediate_unit=intermediate_unit(study), decode_time=decode_time,
                          min_speedup=job.min_speedup)
    with lock:
        enqueue_informed(study, job, session, clusters, objective.max_drop, storage, objective.min_drop)
    with tqdm(total=job.total_trials, initial=count_trials(study)[0], desc=f"search {name}", unit="trial",
              disable=not progress) as bar:
        run_trials(study, job, objective, lock, storage, bar, should_stop, poll_seconds)
    if count_trials(study)[0] < job.total_trials:  # stopped early (cancelled)
        return SearchResult(study, best_trial(study), None, None)
    with lock:
        model_dir, artifact_id = conclude(study, storage, session, job, out_dir,
                                          artifact_dir or default_artifact_dir(storage_url))
    return SearchResult(study, best_trial(study), model_dir, artifact_id)


def run_trials(study: optuna.Study, job: SearchJob, objective: Objective, lock: StudyLock,
               storage: optuna.storages.BaseStorage, bar: tqdm, should_stop: Callable[[], bool] | None = None,
               poll_seconds: float = 5.0) -> None:
    """Claim and run trials until the study holds ``job.total_trials`` finished ones or ``should_stop`` says
    stop; wait while other processes hold the last slots; give up when more trials failed than the budget."""
    failures = 0
    while should_stop is None or not should_stop():
        claimed = claim_and_run(study, job, objective, lock, storage)
        if claimed is None:
            return  # the budget is finished
        if claimed < 0:  # other processes hold the last slots: wait for them (or their heartbeat to lapse)
            time.sleep(poll_seconds)
        failures += max(claimed, 0)
        if failures > job.trials:
            raise AdaPrunerError(f"{failures} trials failed; see their fail_reason attribute in the study")
        show_progress(bar, study)


def claim_and_run(study: optuna.Study, job: SearchJob, objective: Objective, lock: StudyLock,
                  storage: optuna.storages.BaseStorage) -> int | None:
    """One turn: under the study lock, fail dead trials, queue failed baselines again, and claim one trial if
    the budget has room (the lock is released as soon as the trial exists), then run it. Returns how many
    trials failed in the turn through their own fault (1 or 0); -1 when every remaining slot is held by another
    process; ``None`` when the budget is finished. A storage error while claiming propagates: the caller waits
    for the storage."""
    lock.acquire()
    try:
        fail_dead_trials(study)
        requeue_failed_baselines(study, job)
        finished, running = count_trials(study)
        if finished >= job.total_trials:
            return None
        if finished + running >= job.total_trials:
            return -1
        with warnings.catch_warnings():  # Optuna's: heartbeats are for optimize(); run_trial keeps its own
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = study.ask()
        mark_alive(storage, trial)  # before other processes may look at it (see fail_dead_trials)
    finally:
        lock.release()  # the trial exists now: other processes may claim theirs
    return run_trial(study, trial, objective, storage)


def run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective,
              storage: optuna.storages.BaseStorage) -> int:
    """Run a claimed trial under a heartbeat that outlives storage outages, its calls to the storage waiting them
    out (:class:`~adapruner.search.storage.PatientTrial`), and tell the study its end, waiting for the storage if
    need be (:func:`~adapruner.search.storage.finish_trial`). A trial the objective fails is FAIL with its
    reason; one the storage failed all the same (an outage longer than the patience) is FAIL with that reason
    and queued again, and is not the job's failure. Returns 1 when the trial failed through its own fault."""
    reason, retry = None, False
    with Heartbeat(storage, trial):
        try:
            value, state = objective(PatientTrial(trial)), TrialState.COMPLETE
        except optuna.TrialPruned:
            value, state = None, TrialState.PRUNED
        except STORAGE_ERRORS as exc:
            value, state, retry = None, TrialState.FAIL, True
            reason = f"storage unavailable: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        except Exception as exc:  # the trial's own failure: recorded, and the search goes on
            value, state = None, TrialState.FAIL
            kind = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
            reason = f"{kind}: {exc}"
            logger.warning("trial %d failed: %s", trial.number, reason)
    told = finish_trial(study, trial, state, value, reason, retry=retry)
    release_memory()  # the trial's copy and its backward's pages, before the next trial
    return int(told and state == TrialState.FAIL and not retry)


def show_progress(bar: tqdm, study: optuna.Study) -> None:
    """The progress bar at the study's finished trials, with the best validation perplexity so far."""
    bar.n = count_trials(study)[0]
    best = best_trial(study)
    if best is not None:
        bar.set_postfix(best_val_ppl=f"{best.value:.3f}", refresh=False)
    bar.refresh()


def conclude(study: optuna.Study, storage: optuna.storages.BaseStorage, session: PruningSession, job: SearchJob,
             out_dir: str | Path | None, artifact_dir: str | Path) -> tuple[Path | None, str | None]:
    """After the last trial (call it holding the study lock): choose among the finalists, export the choice,
    score the tasks and measure the models' cost. Returns the exported folder and artifact."""
    if session.on_step is not None:
        session.on_step("selection", 0, 1)
    record_selection(study, session, job)
    model_dir, artifact_id = export_best(study, storage, session, job, out_dir, artifact_dir)
    score_tasks(study, session, job)
    measure_models(study, session, job, model_dir)
    return model_dir, artifact_id


