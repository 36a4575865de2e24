"""A job's life cycle, shared by the API routes and the workers: create, look up, cancel, claim, finish.

A job's trials live in its Optuna study (same database), one study per target when the job asks for
several (:func:`adapruner.search.target_study_name`); the ``jobs`` row holds what Optuna does not: the
submitted spec, the lifecycle status, the owner and the result's artifact. What the API shows of a job is
:mod:`service.views`.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import optuna
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from adapruner.search import (
    GGUF_ARTIFACT,
    SearchJob,
    StudyKey,
    StudyLock,
    count_trials,
    create_study,
    fail_dead_trials,
    target_study_name,
)

from .db import Job, JobStatus, utcnow
from .schemas import JobCreate
from .settings import Settings


class NotFound(Exception):
    """No such job, or one the caller may not see (HTTP 404)."""


class Conflict(Exception):
    """The job is not in a state that allows this (HTTP 409)."""


class Forbidden(Exception):
    """The caller may see the job but not cancel it: it belongs to another token (HTTP 403)."""


class InvalidTarget(Exception):
    """A model asked for by a target the job does not have (or without one, of a job of several)."""


class InvalidFormat(Exception):
    """A model asked for in a format the job does not give (HTTP 422)."""


@dataclass(frozen=True)
class Caller:
    """Who is asking: the id of a valid token (a job's owner), and whether it is an admin token."""

    owner: str
    admin: bool = False

    def sees(self, job: Job) -> bool:
        return self.admin or job.owner == self.owner


def job_targets(job: Job) -> list[tuple[float | int, str]]:
    """Each target of the job (in the order asked) with the name of its study."""
    targets = JobCreate.model_validate(job.spec).targets
    return [(t, target_study_name(job.study_name, t, len(targets) > 1)) for t in targets]


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
        for target, name in job_targets(job):
            create_study(storage, name, spec.to_search_job(target))
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
    """Cancel an active job: one conditional UPDATE in a transaction that starts as a writer, so concurrent
    cancels, submissions and claims wait for each other instead of failing (SQLite refuses to turn a read
    transaction into a write once another write has landed); of two cancels at once, one wins, the other
    is told the job is already cancelled."""
    job = get_job(db, job_id, reader)
    if not caller.sees(job):
        raise Forbidden(f"job {job_id} belongs to another token; only its owner (or an admin token) may cancel it")
    db.rollback()  # end the read: the write below starts its own transaction
    with db.begin():
        writing(db)
        result = db.execute(update(Job).where(Job.id == job_id, Job.status.in_([JobStatus.queued, JobStatus.running]))
                            .values(status=JobStatus.cancelled.value, finished_at=utcnow()))
    db.refresh(job)
    if result.rowcount != 1:
        raise Conflict(f"job {job_id} is already {job.status}")
    return job


def writing(db: Session) -> None:
    """Start the session's transaction as a writer: on SQLite ``BEGIN IMMEDIATE`` (its write lock from the
    first statement, waiting for it as long as the busy timeout allows; see ``db.make_engine``); elsewhere a
    plain transaction."""
    db.connection(execution_options={"sqlite_immediate": True})


def load_study(storage: optuna.storages.BaseStorage, job: Job, name: str | None = None) -> optuna.Study | None:
    """The study ``name`` of the job (default: its first target's), if it exists."""
    try:
        return optuna.load_study(study_name=name or job_targets(job)[0][1], storage=storage)
    except KeyError:
        return None


def load_studies(storage: optuna.storages.BaseStorage, job: Job) -> list[tuple[float | int, optuna.Study]]:
    """Each target and its study, for the studies that exist."""
    found = [(target, load_study(storage, job, name)) for target, name in job_targets(job)]
    return [(target, study) for target, study in found if study is not None]


def stored_job(storage: optuna.storages.BaseStorage, job: Job) -> SearchJob:
    """The search a job runs, as its first target's study stored it at submission (a worker runs that, not
    a new conversion of the spec); the spec's own conversion for a job whose study holds none."""
    study = load_study(storage, job)
    stored = study.user_attrs.get(StudyKey.JOB) if study is not None else None
    return SearchJob.from_dict(stored) if stored else JobCreate.model_validate(job.spec).to_search_job()


def target_artifact(job: Job, storage: optuna.storages.BaseStorage, target: float | None,
                    file_format: str = "tar") -> str:
    """The artifact of the job's best model at ``target`` (which a job of several targets must name): the
    folder as a tar archive, or (``file_format`` ``gguf``) the GGUF file of a job submitted with export_format gguf."""
    if file_format == "gguf":
        return _gguf_artifact(job, storage, target)
    targets = job_targets(job)
    if target is None:
        if len(targets) > 1:
            raise InvalidTarget(f"job {job.id} has several targets: name one with ?target= "
                                f"({', '.join(f'{r:g}' for r, _ in targets)})")
        if not job.artifact_id:
            raise Conflict(f"job {job.id} has no model yet (status {job.status})")
        return job.artifact_id
    names = [name for value, name in targets if math.isclose(value, target, rel_tol=1e-9)]
    if not names:
        raise InvalidTarget(f"job {job.id} has no target {target:g} (its targets: "
                            f"{', '.join(f'{r:g}' for r, _ in targets)})")
    study = load_study(storage, job, names[0])
    recorded = study.user_attrs.get(StudyKey.BEST_MODEL) if study is not None else None
    if not recorded:
        raise Conflict(f"job {job.id} has no model for target {target:g} yet (status {job.status})")
    return recorded["artifact_id"]


def _gguf_artifact(job: Job, storage: optuna.storages.BaseStorage, target: float | None) -> str:
    if job.spec.get("export_format") != "gguf":
        raise InvalidFormat(f"job {job.id} was not submitted with export_format gguf: its model is a transformers "
                            "folder only (format=tar)")
    targets = job_targets(job)
    if target is None and len(targets) > 1:
        raise InvalidTarget(f"job {job.id} has several targets: name one with ?target= "
                            f"({', '.join(f'{r:g}' for r, _ in targets)})")
    names = [name for value, name in targets if target is None or math.isclose(value, target, rel_tol=1e-9)]
    if not names:
        raise InvalidTarget(f"job {job.id} has no target {target:g} (its targets: "
                            f"{', '.join(f'{r:g}' for r, _ in targets)})")
    study = load_study(storage, job, names[0])
    recorded = (study.user_attrs.get(StudyKey.BEST_MODEL) if study is not None else None) or {}
    if GGUF_ARTIFACT not in recorded:
        raise Conflict(f"job {job.id} has no GGUF model yet (status {job.status})")
    return recorded[GGUF_ARTIFACT]


# -- workers --------------------------------------------------------------------------------------


# The PostgreSQL advisory lock that serialises job starts across workers (any fixed key of our own).
CLAIM_LOCK_KEY = 727274


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
            db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})
        else:
            writing(db)
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


def record_phase(db: Session, job_id: str, phase: str, done: int, total: int) -> None:
    """Record what a running job's worker is doing before its first trial (shown as its progress)."""
    with db.begin():
        db.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
                   .values(phase={"phase": phase, "done": done, "total": total}))


def job_status(db: Session, job_id: str) -> str:
    with db.begin():
        return db.scalar(select(Job.status).where(Job.id == job_id))
