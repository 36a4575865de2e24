"""Optuna storage for a search: heartbeats, the repair of trials whose process died, trial counting.

This is the one module that reaches into Optuna's private API (``study._storage``, ``trial._trial_id``
and the heartbeat methods of ``RDBStorage``), which Optuna offers no public door to; keep such uses here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from .lock import StudyLock
from .record import FINISHED, TrialKey
from .samplers import chosen_experimental_features

logger = logging.getLogger(__name__)

# A worker beats every HEARTBEAT seconds; one silent for GRACE seconds is taken for dead.
HEARTBEAT_SECONDS = int(os.environ.get("ADAPRUNER_HEARTBEAT_SECONDS", 15))
GRACE_SECONDS = int(os.environ.get("ADAPRUNER_GRACE_SECONDS", 45))
# How long a process waits for SQLite's write lock before it gives up with "database is locked".
SQLITE_BUSY_SECONDS = 60
WORKER = f"{socket.gethostname()}:{os.getpid()}"
# The storage is away or refused a write: nothing a job did, and what a worker waits out.
STORAGE_ERRORS = (OperationalError, DBAPIError, optuna.exceptions.StorageInternalError)
RETRY_SECONDS = 1.0  # a heartbeat or a tell that met a storage error tries again this soon (doubling, up to 30 s)
PATIENCE_SECONDS = 600.0  # a tell gives up after this long without the storage (the trial is then failed as stale)
MAX_RETRY = 3  # times a trial that failed for want of its process or of the storage is queued again


def make_storage(url: str | None, create_tables: bool = True) -> optuna.storages.BaseStorage:
    """Optuna storage for ``url`` (``None``: in memory), with heartbeats and retry of dead trials.

    ``create_tables=False`` for processes that must find the schema prepared (service workers/API).
    """
    if url is None:
        return optuna.storages.InMemoryStorage()
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_SECONDS}  # processes on one file wait, not fail
        use_wal(url)
    # Processes starting together on a fresh database would race to create Optuna's tables.
    with StudyLock(url, "__schema__") if create_tables else contextlib.nullcontext(), chosen_experimental_features():
        return RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=not create_tables,
                          heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Close the storage's database connections (an RDB storage's pool; nothing for others). A process
    that opens storages again and again (an API app per test, say) would otherwise keep every pool open."""
    engine = getattr(getattr(storage, "_backend", storage), "engine", None)
    if engine is not None:
        engine.dispose()


def use_wal(url: str) -> None:
    """Put a SQLite database file (created if need be) in write-ahead-log mode.

    In SQLite's default rollback-journal mode a reader holds a lock that keeps the writer out, and a
    writer waiting for it keeps new readers out: an API answering polls, a trial recording its values
    and a job being submitted can then block each other until one gives up ("database is locked").
    With WAL, readers and the one writer never block each other; only writers wait, for each other's
    short transactions. The mode is stored in the file, so it holds for every later connection.
    """
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or database in (None, "", ":memory:"):
        return
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(database, timeout=SQLITE_BUSY_SECONDS)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def has_heartbeats(storage: optuna.storages.BaseStorage) -> bool:
    # Optuna's heartbeat interface is private; RDBStorage and the cache a Study wraps it in both have it.
    return getattr(storage, "get_heartbeat_interval", lambda: None)() is not None


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail (and queue again) the running trials of processes that died. Call it holding the study lock.

    Optuna's heartbeat check finds a dead process's trial only once the trial has a heartbeat. A process
    killed between creating its trial and the first beat leaves one that stays RUNNING forever and
    holds a slot of the budget. A live process marks its trial (a heartbeat, and the ``worker``
    attribute: see ``run_search``) before it releases the lock, so an unmarked running trial seen
    under the lock belongs to a process that died holding it.
    """
    storage = study._storage
    if not has_heartbeats(storage):
        return
    grace = getattr(getattr(storage, "_backend", storage), "grace_period", None) or GRACE_SECONDS
    dead = {trial_id: f"no heartbeat for {grace} s: its process died or lost the storage for that long"
            for trial_id in storage._get_stale_trial_ids(study._study_id)}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if TrialKey.WORKER not in trial.user_attrs:
            dead[trial._trial_id] = "its process died before its first heartbeat"
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial_id, reason in dead.items():
        logger.warning("trial %d: %s; failing it and queueing it again", storage.get_trial(trial_id).number, reason)
        try:
            storage.set_trial_user_attr(trial_id, TrialKey.FAIL_REASON, reason)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile by its own process
        if retry is not None:
            retry(study, storage.get_trial(trial_id))


def count_trials(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials of the study."""
    trials = study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
    finished = sum(t.state in FINISHED for t in trials)
    return finished, len(trials) - finished


class Heartbeat:
    """A running trial's heartbeat (RDB storages), beaten every interval by a thread that outlives storage
    errors: Optuna's own heartbeat thread dies on its first failed beat, so that a storage outage shorter
    than the grace period still got a live trial failed as stale by another process. This one logs the
    error, tries again every :data:`RETRY_SECONDS` until the storage answers, then goes on beating."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial: optuna.Trial):
        self.storage, self.trial_id = storage, trial._trial_id
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial.number}", daemon=True)

    def __enter__(self) -> Heartbeat:
        if has_heartbeats(self.storage):
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        wait, failing = interval, False
        while not self.stopped.wait(wait):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except STORAGE_ERRORS as exc:
                if not failing:
                    logger.warning("heartbeat of trial %d: storage unavailable (%s); trying again",
                                   self.trial_id, str(exc).splitlines()[0])
                wait, failing = min(RETRY_SECONDS, interval), True
            else:
                wait, failing = interval, False


def patiently(call, what: str):
    """``call()``, tried again through storage errors (every :data:`RETRY_SECONDS`, doubling up to 30 s) for up to
    :data:`PATIENCE_SECONDS`; then the error propagates."""
    delay, deadline = RETRY_SECONDS, time.monotonic() + PATIENCE_SECONDS
    while True:
        try:
            return call()
        except STORAGE_ERRORS as exc:
            if time.monotonic() > deadline:
                raise
            logger.warning("%s: storage unavailable (%s); trying again in %.0f s", what, str(exc).splitlines()[0],
                           delay)
            time.sleep(delay)
            delay = min(30.0, 2 * delay)


class PatientTrial:
    """An ``optuna.Trial`` whose calls (report, should_prune, suggest_*, set_user_attr, ...) wait out storage errors
    (:func:`patiently`): an outage in the middle of a trial pauses it instead of failing it, while its
    :class:`Heartbeat` keeps it alive."""

    def __init__(self, trial: optuna.Trial):
        self._trial = trial

    def __getattr__(self, name: str):
        attribute = getattr(self._trial, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            return patiently(lambda: attribute(*args, **kwargs), f"trial {self._trial.number}: {name}")

        return call


def finish_trial(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None = None,
                 reason: str | None = None, retry: bool = False) -> bool:
    """Tell the study how ``trial`` ended (``reason``: a failed trial's ``fail_reason``; ``retry``: queue its
    parameters again, for a trial that failed for want of the storage), waiting out storage errors for up to
    :data:`PATIENCE_SECONDS`. Returns ``False``, dropping the result, when another process finished the trial
    meanwhile (it lost its heartbeat for longer than the grace period, was failed as stale and queued again:
    the queued copy runs it afresh)."""
    def tell() -> None:
        if state == TrialState.FAIL and reason is not None:
            trial.set_user_attr(TrialKey.FAIL_REASON, reason[:500])
        elif state != TrialState.FAIL and trial.user_attrs.get(TrialKey.FAIL_REASON):
            trial.set_user_attr(TrialKey.FAIL_REASON, None)  # a queued-again copy inherits its original's
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)

    try:
        patiently(tell, f"trial {trial.number}: tell")
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        if patiently(lambda: study._storage.get_trial(trial._trial_id).state, "trial state") == TrialState.RUNNING:
            raise  # refused for another reason than being finished elsewhere
        logger.warning("trial %d was finished by another process while this one ran it (failed as stale and "
                       "queued again): its result is dropped", trial.number)
        return False
    if retry:  # as a trial whose process died is: the same parameters, queued again
        patiently(lambda: RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(
            study, study._storage.get_trial(trial._trial_id)), f"trial {trial.number}: queue again")
    return True


def mark_alive(storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> None:
    """Record a first heartbeat and this process as the trial's ``worker`` (see :func:`fail_dead_trials`)."""
    if has_heartbeats(storage):
        storage.record_heartbeat(trial._trial_id)
    trial.set_user_attr(TrialKey.WORKER, WORKER)
