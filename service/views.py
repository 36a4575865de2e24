"""What the API shows of a job: its summary and progress, its targets, trials and measurements, read from the
job's row and its Optuna studies (:mod:`service.jobs` changes them)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, func, select
from sqlalchemy.orm import Session

from adapruner.search import (
    FINISHED,
    StudyKey,
    TrialKey,
    baseline_draws,
    baseline_of,
    best_trial,
    load_line,
    stored,
)

from .db import Job, JobStatus, utcnow
from .jobs import job_targets, load_studies, study_budget
from .schemas import JobOut, Links, Progress, TargetOut, TrialSummary
from .settings import Settings


def trial_summary(trial: FrozenTrial, target: float | int | None = None) -> TrialSummary:
    attrs = trial.user_attrs
    return TrialSummary(
        number=trial.number, target=target, state=trial.state.name.lower(),
        value=trial.value if trial.state == TrialState.COMPLETE else None,
        test_ppl=attrs.get(TrialKey.TEST_PPL), heldout_ppl=attrs.get(TrialKey.HELDOUT_PPL), baseline=baseline_of(trial),
        draw=attrs.get(TrialKey.DRAW),
        params=trial.params,
        windows=attrs.get(TrialKey.WINDOWS), removed_share=stored(attrs, TrialKey.REMOVED_SHARE),
        seconds=attrs.get(TrialKey.SECONDS),
        worker=attrs.get(TrialKey.WORKER), fail_reason=attrs.get(TrialKey.FAIL_REASON),
        started=trial.datetime_start, completed=trial.datetime_complete,
    )


def public_spec(spec: dict, settings: Settings) -> dict:
    """The spec as served: local paths as the user gave them, relative to the configured roots (the
    worker needs them resolved; nobody else needs to learn where the server keeps its files)."""
    roots = [str(r.resolve()) + "/" for r in (settings.models_root, settings.texts_root) if r is not None]

    def relative(value: str) -> str:
        for root in roots:
            value = value.replace(root, "")
        return value

    shown = dict(spec)
    shown["model"] = relative(spec["model"])
    for key in ("calibration", "evaluation", "heldout"):
        if spec.get(key) is not None:
            shown[key] = [relative(v) for v in spec[key]]
    return shown


@dataclass(frozen=True)
class StudyDigest:
    """What a job's progress needs of its study: its id, trials per state and the first trial's start."""

    study_id: int
    states: Counter
    first_start: datetime | None

    @classmethod
    def of(cls, storage: optuna.storages.BaseStorage, study: optuna.Study, trials: list[FrozenTrial]) -> StudyDigest:
        starts = [t.datetime_start for t in trials if t.datetime_start is not None]
        return cls(storage.get_study_id_from_name(study.study_name), Counter(t.state for t in trials),
                   min(starts, default=None))

    @classmethod
    def combine(cls, digests: list[StudyDigest]) -> StudyDigest | None:
        """A job of several targets as one digest: the first study's id (the dashboard link), every
        study's trials, the earliest start."""
        if not digests:
            return None
        starts = [d.first_start for d in digests if d.first_start is not None]
        return cls(digests[0].study_id, sum((d.states for d in digests), Counter()), min(starts, default=None))


def job_digest(job: Job, digests: dict[str, StudyDigest]) -> StudyDigest | None:
    """The job's digest from :func:`study_digests` of its studies' names."""
    return StudyDigest.combine([digests[name] for _, name in job_targets(job) if name in digests])


# Optuna's own tables, read directly for the job list: one query per page instead of loading every
# trial of every study listed (a page of 20 jobs of 40 trials: 1.2 ms against 762 ms on SQLite, 2.3 against
# 886 ms on PostgreSQL; bench/job_list.py). Only columns
# that Optuna's RDB schema has kept since 2.0 (optuna/storages/_rdb/models.py) are named.
_optuna = MetaData()
_studies = Table("studies", _optuna, Column("study_id", Integer), Column("study_name", String))
_trials = Table("trials", _optuna, Column("study_id", Integer), Column("state", String),
                Column("datetime_start", DateTime))


def study_digests(db: Session, names: list[str]) -> dict[str, StudyDigest]:
    """:class:`StudyDigest` of each named study that exists, in two queries."""
    if not names:
        return {}
    ids = dict(db.execute(select(_studies.c.study_name, _studies.c.study_id)
                          .where(_studies.c.study_name.in_(names))).all())
    states: dict[int, Counter] = {i: Counter() for i in ids.values()}
    starts: dict[int, datetime | None] = dict.fromkeys(ids.values())
    rows = db.execute(select(_trials.c.study_id, _trials.c.state, func.count(), func.min(_trials.c.datetime_start))
                      .where(_trials.c.study_id.in_(ids.values())).group_by(_trials.c.study_id, _trials.c.state))
    for study_id, state, count, start in rows:
        states[study_id][TrialState[state]] += count
        if start is not None and (starts[study_id] is None or start < starts[study_id]):
            starts[study_id] = start
    return {name: StudyDigest(i, states[i], starts[i]) for name, i in ids.items()}


def progress(job: Job, digest: StudyDigest) -> Progress:
    """Trials done, running and left, what the job is doing, and when it should end.

    The ETA is the trials left over the rate at which the job has finished them since its first trial
    started: a wall-clock rate, so it counts every worker on the job, and the time trials spend
    waiting for a worker.
    """
    count = digest.states
    finished = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
    budget = study_budget(job) * len(job_targets(job))
    eta = None
    if finished and finished < budget and job.status == JobStatus.running.value:
        elapsed = (utcnow() - digest.first_start.astimezone(UTC)).total_seconds()
        eta = elapsed / finished * (budget - finished)
    if job.status != JobStatus.running.value:
        phase = job.status
    elif digest.first_start is not None:
        phase = f"trial {min(finished + 1, budget)}/{budget}"
    else:
        step = job.phase
        phase = f"{step['phase']} {step['done']}/{step['total']}" if step else "waiting for a worker"
    return Progress(finished=finished, running=count[TrialState.RUNNING], stopped_early=count[TrialState.PRUNED],
                    failed=count[TrialState.FAIL], budget=budget, eta_seconds=eta, phase=phase)


def job_view(job: Job, storage: optuna.storages.BaseStorage, settings: Settings) -> JobOut:
    """The job as served, with its progress, each target's best trial, baselines and measurements, and how
    to load the result."""
    studies = [(target, study, study.get_trials(deepcopy=False)) for target, study in load_studies(storage, job)]
    if not studies:
        return job_summary(job, settings, None)
    out = job_summary(job, settings, StudyDigest.combine([StudyDigest.of(storage, s, t) for _, s, t in studies]))
    several = len(job_targets(job)) > 1
    out.targets = [target_view(target, study, trials, out.links.model, several) for target, study, trials in studies]
    first = studies[0][1]
    out.unpruned = stored(first.user_attrs, StudyKey.UNPRUNED)
    if not several:
        target = out.targets[0]
        out.best, out.baselines, out.tasks = target.best, target.baselines, target.tasks
        out.inference_cost = target.inference_cost
        out.finetune = stored(first.user_attrs, StudyKey.FINETUNE)
        if job.best_trial is not None:
            out.load = load_line(first.trials[job.best_trial])
    return out


def target_view(target: float | int, study: optuna.Study, trials: list[FrozenTrial], model_link: str,
                several: bool) -> TargetOut:
    baselines = [trial_summary(t) for draws in baseline_draws(study).values() for t in draws]
    best = best_trial(study)
    return TargetOut(
        target=target, study_name=study.study_name, finished=sum(t.state in FINISHED for t in trials),
        best=trial_summary(best) if best is not None else None, baselines=baselines,
        tasks=study.user_attrs.get(StudyKey.TASKS), inference_cost=study.user_attrs.get(StudyKey.INFERENCE_COST),
        model=f"{model_link}?target={target:g}" if several else model_link,
        has_model=StudyKey.BEST_MODEL in study.user_attrs,
    )


def job_summary(job: Job, settings: Settings, digest: StudyDigest | None) -> JobOut:
    """The job as the job list serves it: no best trial and no baselines (see :func:`study_digests`)."""
    path = f"{(settings.public_url or '').rstrip('/')}/v1/jobs/{job.id}"
    dashboard = None
    if digest is not None and settings.dashboard_url:
        dashboard = f"{settings.dashboard_url.rstrip('/')}/dashboard/studies/{digest.study_id}"
    return JobOut(
        id=job.id, name=job.name, status=job.status, spec=public_spec(job.spec, settings), created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, error=job.error, study_name=job.study_name,
        links=Links(self=path, trials=f"{path}/trials", model=f"{path}/model", report=f"{path}/report",
                    dashboard=dashboard),
        progress=progress(job, digest) if digest is not None else None,
    )
