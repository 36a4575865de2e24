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
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

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
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))


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
    with chosen_experimental_features():
        optuna.storages.fail_stale_trials(study)
    if not has_heartbeats(storage):
        return
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if TrialKey.WORKER in trial.user_attrs:
            continue
        logger.warning("trial %d was left running by a process that died before its first heartbeat: "
                       "failing it", trial.number)
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if retry is not None:
            retry(study, storage.get_trial(trial._trial_id))


def count_trials(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials of the study."""
    trials = study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
    finished = sum(t.state in FINISHED for t in trials)
    return finished, len(trials) - finished


def mark_alive(storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> None:
    """Record a first heartbeat and this process as the trial's ``worker`` (see :func:`fail_dead_trials`)."""
    if has_heartbeats(storage):
        storage.record_heartbeat(trial._trial_id)
    trial.set_user_attr(TrialKey.WORKER, WORKER)
