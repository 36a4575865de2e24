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

from sqlalchemy.exc import OperationalError

from adapruner.search import make_storage, open_session, run_search, write_report

from . import jobs
from .db import JobStatus, check_schema, make_engine, session_factory
from .schemas import JobCreate
from .settings import Settings

logger = logging.getLogger("adapruner.worker")


class Worker:
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
        """Serve jobs until stopped (or, with ``once``, until no job has work left)."""
        while not self.stopping.is_set():
            try:
                with self.sessions() as db:
                    job = jobs.claim_job(db, self.storage, self.settings)
            except OperationalError as exc:  # the database is busy or briefly away: try again later
                logger.warning("could not claim a job: %s", str(exc).splitlines()[0])
                job = None
            if job is None:
                if once:
                    return
                self.stopping.wait(self.settings.worker_poll_seconds)
                continue
            self.serve(job)

    def _session(self, job_id: str, spec: JobCreate):
        if self._loaded is None or self._loaded[0] != job_id:
            self._loaded = None  # free the previous job's model before loading the next
            session = open_session(spec.to_search_job(), self.device, self.dtype,
                                   trust_remote_code=spec.trust_remote_code, progress=self.progress)
            self._loaded = (job_id, session)
        return self._loaded[1]

    def serve(self, job) -> None:
        logger.info("serving job %s (%s)", job.id, job.study_name)
        spec = JobCreate.model_validate(job.spec)

        def should_stop() -> bool:
            if self.stopping.is_set():
                return True
            with self.sessions() as db:
                return jobs.job_status(db, job.id) != JobStatus.running.value

        try:
            result = run_search(spec.to_search_job(), self.settings.db_url, job.study_name,
                                session=self._session(job.id, spec), artifact_dir=self.settings.artifacts,
                                progress=self.progress, should_stop=should_stop, storage=self.storage)
        except Exception as exc:  # the job, not the worker, failed: record why and go on
            logger.exception("job %s failed", job.id)
            with self.sessions() as db:
                jobs.finish_job(db, job.id, JobStatus.failed, error=f"{type(exc).__name__}: {exc}"[:2000])
            return
        if result.artifact_id is None:
            return  # cancelled, or this worker is draining
        with self.sessions() as db:
            finished = jobs.finish_job(db, job.id, JobStatus.succeeded, best_trial=result.best_trial.number,
                                       artifact_id=result.artifact_id)
        if finished:
            write_report(result.study, self.settings.jobs_dir / job.id)
            logger.info("job %s succeeded: best trial %s", job.id, result.best_trial.number)
