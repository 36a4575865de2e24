"""Job operations shared by the API routes and the workers: create, look up, summarise, claim, finish.

A job's trials live in its Optuna study (same database), one study per target when the job asks for
several (:func:`adapruner.search.target_study_name`); the ``jobs`` row holds what Optuna does not: the
submitted spec, the lifecycle status, the owner and the result's artifact.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, func, select, text, update
from sqlalchemy.orm import Session

from adapruner.search import (
    FINISHED,
    StudyKey,
    StudyLock,
    TrialKey,
    baseline_draws,
    baseline_of,
    best_trial,
    count_trials,
    create_study,
    fail_dead_trials,
    load_line,
    target_study_name,
)

from .db import Job, JobStatus, utcnow
from .schemas import JobCreate, JobOut, Links, Progress, TargetOut, TrialSummary
from .settings import Settings


class NotFound(Exception):
    """No such job, or one the caller may not see (HTTP 404)."""


class Conflict(Exception):
    """The job is not in a state that allows this (HTTP 409)."""


class Forbidden(Exception):
    """The caller may see the job but not cancel it: it belongs to another token (HTTP 403)."""


class InvalidTarget(Exception):
    """A model asked for by a target the job does not have (or without one, of a job of several)."""


@dataclass(frozen=True)
class Caller:
    """Who is asking: the id of a valid token (a job's owner), and whether it is an admin token."""

    owner: str
    admin: bool = False

    def sees(self, job: Job) -> bool:
        return self.admin or job.owner == self.owner


def job_targets(job: Job) -> list[tuple[float | int, str]]:
    """Each target of the job (its ratios, in the order asked) with the name of its study."""
    ratio = job.spec["ratio"]
    ratios = ratio if isinstance(ratio, list) else [ratio]
    return [(r, target_study_name(job.study_name, r, len(ratios) > 1)) for r in ratios]


def study_budget(job: Job) -> int:
    """Trials each of the job's studies finishes: its searched trials and one per baseline run."""
    return JobCreate.model_validate(job.spec).to_search_job().total_trials


def create_job(db: Session, storage: optuna.storages.BaseStorage, spec: JobCreate, owner: str | None) -> Job:
    """Store the job and create its studies, baselines queued, so workers find everything ready."""
    job_id = uuid.uuid4().hex
    # The study carries the job's name, so the dashboard's list says which job each study is.
    study_name = f"{spec.name}-{job_id[:8]}" if spec.name else f"job-{job_id}"
    job = Job(id=job_id, name=spec.name, spec=spec.model_dump(mode="json"), owner=owner, study_name=study_name)
    created = []
    try:
        for ratio, name in job_targets(job):
            create_study(storage, name, spec.to_search_job(ratio))
            created.append(name)
        db.add(job)
        db.commit()
    except Exception:
        # No study without its job: a study nobody can see or cancel would hold queued trials forever.
        db.rollback()
        for name in created:
            optuna.delete_study(study_name=name, storage=storage)
        raise
    return job


def get_job(db: Session, job_id: str, reader: Caller | None = None) -> Job:
    """The job, if ``reader`` may see it (``None``: reads are public)."""
    job = db.get(Job, job_id)
    if job is None or (reader is not None and not reader.sees(job)):
        raise NotFound(f"no job {job_id!r}")  # another token's job: as if it did not exist
    return job


def list_jobs(db: Session, status: JobStatus | None, offset: int, limit: int,
              reader: Caller | None = None) -> tuple[list[Job], int]:
    query = select(Job)
    counter = select(func.count()).select_from(Job)
    if status is not None:
        query, counter = query.where(Job.status == status.value), counter.where(Job.status == status.value)
    if reader is not None and not reader.admin:
        query, counter = query.where(Job.owner == reader.owner), counter.where(Job.owner == reader.owner)
    jobs = db.scalars(query.order_by(Job.created_at.desc()).offset(offset).limit(limit)).all()
    return list(jobs), db.scalar(counter)


def cancel_job(db: Session, job_id: str, caller: Caller, reader: Caller | None) -> Job:
    job = get_job(db, job_id, reader)
    if not caller.sees(job):
        raise Forbidden(f"job {job_id} belongs to another token; only its owner (or an admin token) may cancel it")
    if not JobStatus(job.status).active:
        raise Conflict(f"job {job_id} is already {job.status}")
    db.execute(update(Job).where(Job.id == job_id, Job.status.in_([JobStatus.queued, JobStatus.running]))
               .values(status=JobStatus.cancelled.value, finished_at=utcnow()))
    db.commit()
    db.refresh(job)
    return job


# -- views ----------------------------------------------------------------------------------------


def trial_summary(trial: FrozenTrial, target: float | int | None = None) -> TrialSummary:
    attrs = trial.user_attrs
    return TrialSummary(
        number=trial.number, target=target, state=trial.state.name.lower(),
        value=trial.value if trial.state == TrialState.COMPLETE else None,
        test_ppl=attrs.get(TrialKey.TEST_PPL), heldout_ppl=attrs.get(TrialKey.HELDOUT_PPL), baseline=baseline_of(trial),
        draw=attrs.get(TrialKey.DRAW),
        params=trial.params,
        windows=attrs.get(TrialKey.WINDOWS), ratio=attrs.get(TrialKey.RATIO), seconds=attrs.get(TrialKey.SECONDS),
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


def load_study(storage: optuna.storages.BaseStorage, job: Job, name: str | None = None) -> optuna.Study | None:
    """The study ``name`` of the job (default: its first target's), if it exists."""
    try:
        return optuna.load_study(study_name=name or job_targets(job)[0][1], storage=storage)
    except KeyError:
        return None


def load_studies(storage: optuna.storages.BaseStorage, job: Job) -> list[tuple[float | int, optuna.Study]]:
    """Each target's ratio and study, for the studies that exist."""
    found = [(ratio, load_study(storage, job, name)) for ratio, name in job_targets(job)]
    return [(ratio, study) for ratio, study in found if study is not None]




@dataclass(frozen=True)
class StudyDigest:
    """What a job's progress needs of its study: its id, trials per state, the first trial's start,
    and the phase a worker recorded before the first trial."""

    study_id: int
    states: Counter
    first_start: datetime | None
    phase: dict | None

    @classmethod
    def of(cls, storage: optuna.storages.BaseStorage, study: optuna.Study, trials: list[FrozenTrial]) -> StudyDigest:
        starts = [t.datetime_start for t in trials if t.datetime_start is not None]
        return cls(storage.get_study_id_from_name(study.study_name), Counter(t.state for t in trials),
                   min(starts, default=None), study.user_attrs.get(StudyKey.PHASE))

    @classmethod
    def combine(cls, digests: list[StudyDigest]) -> StudyDigest | None:
        """A job of several targets as one digest: the first study's id (the dashboard link), every
        study's trials, the earliest start, the first phase recorded."""
        if not digests:
            return None
        starts = [d.first_start for d in digests if d.first_start is not None]
        return cls(digests[0].study_id, sum((d.states for d in digests), Counter()), min(starts, default=None),
                   next((d.phase for d in digests if d.phase), None))


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
_study_attrs = Table("study_user_attributes", _optuna, Column("study_id", Integer), Column("key", String),
                     Column("value_json", Text))


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
    phases = dict(db.execute(select(_study_attrs.c.study_id, _study_attrs.c.value_json)
                             .where(_study_attrs.c.study_id.in_(ids.values()), _study_attrs.c.key == "phase")).all())
    return {name: StudyDigest(i, states[i], starts[i], json.loads(phases[i]) if i in phases else None)
            for name, i in ids.items()}


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
        step = digest.phase
        phase = f"{step['phase']} {step['done']}/{step['total']}" if step else "waiting for a worker"
    return Progress(finished=finished, running=count[TrialState.RUNNING], pruned=count[TrialState.PRUNED],
                    failed=count[TrialState.FAIL], budget=budget, eta_seconds=eta, phase=phase)


def job_view(job: Job, storage: optuna.storages.BaseStorage, settings: Settings) -> JobOut:
    """The job as served, with its progress, each target's best trial, baselines and measurements, and how
    to load the result."""
    studies = [(ratio, study, study.get_trials(deepcopy=False)) for ratio, study in load_studies(storage, job)]
    if not studies:
        return job_summary(job, settings, None)
    out = job_summary(job, settings, StudyDigest.combine([StudyDigest.of(storage, s, t) for _, s, t in studies]))
    several = len(job_targets(job)) > 1
    out.targets = [target_view(ratio, study, trials, out.links.model, several) for ratio, study, trials in studies]
    first = studies[0][1]
    out.dense = first.user_attrs.get(StudyKey.DENSE)
    if not several:
        target = out.targets[0]
        out.best, out.baselines, out.tasks = target.best, target.baselines, target.tasks
        out.inference_cost = target.inference_cost
        out.recovery = first.user_attrs.get(StudyKey.RECOVERY)
        if job.best_trial is not None:
            out.load = load_line(first.trials[job.best_trial])
    return out


def target_view(ratio: float | int, study: optuna.Study, trials: list[FrozenTrial], model_link: str,
                several: bool) -> TargetOut:
    baselines = [trial_summary(t) for draws in baseline_draws(study).values() for t in draws]
    best = best_trial(study)
    return TargetOut(
        ratio=ratio, study_name=study.study_name, finished=sum(t.state in FINISHED for t in trials),
        best=trial_summary(best) if best is not None else None, baselines=baselines,
        tasks=study.user_attrs.get(StudyKey.TASKS), inference_cost=study.user_attrs.get(StudyKey.INFERENCE_COST),
        model=f"{model_link}?target={ratio:g}" if several else model_link,
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


def target_artifact(job: Job, storage: optuna.storages.BaseStorage, target: float | None) -> str:
    """The artifact of the job's best model at ``target`` (which a job of several targets must name)."""
    targets = job_targets(job)
    if target is None:
        if len(targets) > 1:
            raise InvalidTarget(f"job {job.id} has several targets: name one with ?target= "
                                f"({', '.join(f'{r:g}' for r, _ in targets)})")
        if not job.artifact_id:
            raise Conflict(f"job {job.id} has no model yet (status {job.status})")
        return job.artifact_id
    names = [name for ratio, name in targets if math.isclose(ratio, target, rel_tol=1e-9)]
    if not names:
        raise InvalidTarget(f"job {job.id} has no target {target:g} (its targets: "
                            f"{', '.join(f'{r:g}' for r, _ in targets)})")
    study = load_study(storage, job, names[0])
    recorded = study.user_attrs.get(StudyKey.BEST_MODEL) if study is not None else None
    if not recorded:
        raise Conflict(f"job {job.id} has no model for target {target:g} yet (status {job.status})")
    return recorded["artifact_id"]


# -- workers --------------------------------------------------------------------------------------


def claim_job(db: Session, storage: optuna.storages.BaseStorage, settings: Settings) -> Job | None:
    """The next job a worker should serve: a running one with work left, else the oldest queued one.

    PostgreSQL rows are taken with ``FOR UPDATE SKIP LOCKED`` (and job starts serialised by a
    transaction-level advisory lock, so at most ``max_concurrent_jobs`` run); SQLite serialises the
    whole claim through its write lock (``BEGIN IMMEDIATE``, see ``db.make_engine``).
    """
    # Before the claim transaction: Optuna writes through its own connection, which SQLite's write
    # lock, once the claim holds it, would block.
    with db.begin():
        running_jobs = db.scalars(select(Job).where(Job.status == JobStatus.running)).all()
        running_studies = [name for job in running_jobs for _, name in job_targets(job)]
    for study_name in running_studies:
        reclaim_dead_trials(storage, settings.db_url, study_name)
    postgres = db.bind.dialect.name == "postgresql"
    with db.begin():
        if postgres:
            db.execute(text("SELECT pg_advisory_xact_lock(727274)"))
        else:
            db.connection(execution_options={"sqlite_immediate": True})
        running = db.scalars(select(Job).where(Job.status == JobStatus.running).order_by(Job.started_at)).all()
        for job in running:
            if has_open_slots(storage, job):
                return job
        if len(running) >= settings.max_concurrent_jobs:
            return None
        query = select(Job).where(Job.status == JobStatus.queued).order_by(Job.created_at).limit(1)
        if postgres:
            query = query.with_for_update(skip_locked=True)
        job = db.scalar(query)
        if job is None:
            return None
        job.status, job.started_at = JobStatus.running.value, utcnow()
    return job


def reclaim_dead_trials(storage: optuna.storages.BaseStorage, url: str, study_name: str) -> None:
    """Fail (and queue again) the trials of workers that died, so their slots are free to claim."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return
    with StudyLock(url, study_name):
        fail_dead_trials(study)


def has_open_slots(storage: optuna.storages.BaseStorage, job: Job) -> bool:
    """Whether the job's studies still have trials to hand out (or its end still needs recording).

    A worker that joins a job whose last slots are all running would only wait; it is better used on
    a queued job. The exact budget is kept by the study's own lock, not by this check.
    """
    budget = study_budget(job)
    counts = [count_trials(study) for _, study in load_studies(storage, job)]
    if not counts:
        return False
    if any(finished + running < budget for finished, running in counts):
        return True
    return all(finished >= budget for finished, _ in counts)  # all done: the job's end still needs recording


def finish_job(db: Session, job_id: str, status: JobStatus, error: str | None = None, best_trial: int | None = None,
               artifact_id: str | None = None) -> bool:
    """Move a running job to a final state; False if another worker (or a cancel) got there first."""
    values: dict = {"status": status.value, "finished_at": utcnow(), "error": error}
    if best_trial is not None:
        values |= {"best_trial": best_trial, "artifact_id": artifact_id}
    with db.begin():
        result = db.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running).values(**values))
    return result.rowcount == 1


def job_status(db: Session, job_id: str) -> str:
    with db.begin():
        return db.scalar(select(Job.status).where(Job.id == job_id))
