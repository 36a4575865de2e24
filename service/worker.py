"""A worker: claims jobs from the database and runs their trials on its device.

Start any number, on any machine that reaches the database (and the data folder, for artifacts and
cached statistics): ``adapruner worker --db URL --device cuda:0``. Several workers serve one job
together; the study's lock keeps its trial budget exact and Optuna's heartbeat hands the trial of a
worker that died to another. SIGTERM or SIGINT drains a worker: it finishes its trial, then exits.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from adapruner.errors import Stopped
from adapruner.search import (
    STORAGE_ERRORS,
    SearchJob,
    make_storage,
    open_session,
    run_targets,
    write_report,
    write_tradeoff_report,
)

from . import jobs
from .db import JobStatus, check_schema, make_engine, session_factory
from .schemas import JobCreate
from .settings import Settings

logger = logging.getLogger("adapruner.worker")
# The database is away or refused a write: the job has done nothing wrong, and the worker waits it out.
DATABASE_ERRORS = STORAGE_ERRORS
PHASE_SECONDS = 2.0  # record a job's phase at most this often


class Worker:
    """Claims queued jobs one at a time and runs each (statistics, search, export) in this process."""

    def __init__(self, settings: Settings, device: str | None = None, dtype: str | None = None,
                 progress: bool = False):
        self.settings, self.device, self.dtype, self.progress = settings, device, dtype, progress
        # Models, corpora and pool statistics come from (and go to) the shared data folder.
        os.environ.setdefault("ADAPRUNER_CACHE", str(settings.cache_dir))
        engine = make_engine(settings.db_url)
        check_schema(engine)
        self.sessions = session_factory(engine)
        self.storage = make_storage(settings.db_url, create_tables=False)
        self.stopping = threading.Event()
        self._loaded: tuple[str, object] | None = None  # (job id, PruningSession) of the last job

    def install_signal_handlers(self) -> None:
        def drain(signum, _frame):
            logger.warning("signal %s: finishing the current trial, then stopping", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, drain)
        signal.signal(signal.SIGINT, drain)

    def run(self, once: bool = False) -> None:
        """Serve jobs until stopped (or, with ``once``, until no job has work left).

        A database outage never ends the worker: it waits, longer each time (up to a minute), and
        claims again; a job it was serving is picked up again by whichever worker claims it next.
        """
        backoff = 0.0
        while not self.stopping.is_set():
            try:
                with self.sessions() as db:
                    job = jobs.claim_job(db, self.storage, self.settings)
                if job is not None:
                    self.serve(job)
                backoff = 0.0
            except DATABASE_ERRORS as exc:
                backoff = min(60.0, max(1.0, 2 * backoff))
                logger.warning("database unavailable (%s): trying again in %.0f s", str(exc).splitlines()[0], backoff)
                self.stopping.wait(backoff)
                continue
            if job is None:
                if once:
                    return
                self.stopping.wait(self.settings.worker_poll_seconds)

    def _session(self, job, spec: JobCreate, search: SearchJob):
        if self._loaded is None or self._loaded[0] != job.id:
            self._loaded = None  # free the previous job's model before loading the next
            session = open_session(search, self.device, self.dtype,
                                   trust_remote_code=spec.trust_remote_code, progress=self.progress,
                                   on_step=self._phase_recorder(job))
            self._loaded = (job.id, session)
        return self._loaded[1]

    def _cancelled(self, job_id: str) -> bool:
        with self.sessions() as db:
            return jobs.job_status(db, job_id) != JobStatus.running.value

    def _phase_recorder(self, job):
        """``on_step`` for the job's long work before its trials: records the phase in the job's row (at most
        every PHASE_SECONDS) and stops the work within a step once the job is cancelled."""
        last = [0.0]

        def on_step(phase: str, done: int, total: int) -> None:
            if self.stopping.is_set() or self._cancelled(job.id):
                raise Stopped(f"job {job.id} was cancelled")
            now = time.monotonic()
            if now - last[0] >= PHASE_SECONDS or done == 0:
                last[0] = now
                with self.sessions() as db:
                    jobs.record_phase(db, job.id, phase, done, total)

        return on_step

    def serve(self, job) -> None:
        logger.info("serving job %s (%s)", job.id, job.study_name)
        spec = JobCreate.model_validate(job.spec)  # its targets and permissions; the search is the stored one
        search = jobs.stored_job(self.storage, job)

        def should_stop() -> bool:
            return self.stopping.is_set() or self._cancelled(job.id)

        try:
            results = run_targets(search, spec.targets, self.settings.db_url, job.study_name,
                                  session=self._session(job, spec, search), artifact_dir=self.settings.artifacts,
                                  progress=self.progress, should_stop=should_stop, storage=self.storage)
        except Stopped:
            logger.info("job %s: stopped (cancelled, or this worker is draining)", job.id)
            self._loaded = None  # the session may be half built
            return
        except DATABASE_ERRORS:
            raise  # not the job's fault: run() waits for the database; the job stays running for the next worker
        except Exception as exc:  # the job, not the worker, failed: record why and go on
            logger.exception("job %s failed", job.id)
            with self.sessions() as db:
                jobs.finish_job(db, job.id, JobStatus.failed, error=f"{type(exc).__name__}: {exc}"[:2000])
            return
        if len(results) < len(spec.targets) or results[-1].artifact_id is None:
            return  # cancelled, or this worker is draining
        # A job of several targets records its last target's best here; each target's model is in its study.
        result = results[-1]
        with self.sessions() as db:
            finished = jobs.finish_job(db, job.id, JobStatus.succeeded, best_trial=result.best_trial.number,
                                       artifact_id=result.artifact_id)
        if finished:
            folder = self.settings.jobs_dir / job.id
            if len(results) == 1:
                write_report(result.study, folder)
            else:
                for target, result_of_target in zip(spec.targets, results, strict=True):
                    write_report(result_of_target.study, folder / f"r{target:g}")
                write_tradeoff_report([r.study for r in results], folder)
            logger.info("job %s succeeded: best trial %s", job.id, result.best_trial.number)
