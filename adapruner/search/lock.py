"""A mutex shared by every process working on one study, held while a trial is claimed.

Claiming a trial means: count the study's finished and running trials, and if the budget allows,
let Optuna create (or pop a waiting) trial. Without a lock two workers can both see one slot left
and overshoot the budget. The lock lives where the study does:

* PostgreSQL: a transaction-level advisory lock (``pg_advisory_xact_lock``) keyed by the study name,
  held by a transaction kept open for the claim: no table of our own is needed, a dead worker's lock
  dies with its connection, and it stays correct behind PgBouncer in transaction-pooling mode;
* MySQL/MariaDB: ``GET_LOCK`` likewise;
* SQLite: a file lock (``filelock``) beside the database (SQLite itself only works on one machine);
* anything else (in-memory storage): a lock within this process.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from filelock import FileLock
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

_local_locks: dict[str, threading.Lock] = {}


class StudyLock:
    """The mutex of one study (see the module docstring): a context manager, held while a trial is claimed and
    while the study is set up."""

    def __init__(self, storage_url: str | None, study_name: str):
        self.study_name = study_name
        self.url = make_url(storage_url) if storage_url else None
        self._held = False
        self._conn = None
        self._file = None
        self._thread_lock: threading.Lock | None = None

    @property
    def _key(self) -> int:
        # Advisory-lock keys are signed 64-bit integers.
        return int.from_bytes(hashlib.sha256(f"adapruner:{self.study_name}".encode()).digest()[:8], "big", signed=True)

    def acquire(self) -> None:
        if self._held:
            return
        backend = self.url.get_backend_name() if self.url else None
        if backend == "postgresql":
            self._conn = create_engine(self.url, poolclass=NullPool).connect()
            self._conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": self._key})
        elif backend in ("mysql", "mariadb"):
            self._conn = create_engine(self.url, poolclass=NullPool).connect()
            self._conn.execute(text("SELECT GET_LOCK(:name, -1)"), {"name": f"adapruner-{self._key}"})
        elif backend == "sqlite" and self.url.database not in (None, "", ":memory:"):
            database = Path(self.url.database)
            path = database.with_name(f"{database.name}.{self._key & 0xFFFFFFFF:08x}.lock")
            # not a singleton, not reentrant: each StudyLock is its own holder, as for the other backends
            self._file = FileLock(path, is_singleton=False)
            self._file.acquire()
        else:
            self._thread_lock = _local_locks.setdefault(self.study_name, threading.Lock())
            self._thread_lock.acquire()
        self._held = True

    def release(self) -> None:
        """Release if held; safe to call more than once (the objective releases it early)."""
        if not self._held:
            return
        self._held = False
        if self._conn is not None:
            try:
                if self.url.get_backend_name() == "postgresql":
                    self._conn.rollback()  # ends the transaction, and with it the lock
                else:
                    self._conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": f"adapruner-{self._key}"})
            finally:
                self._conn.close()
                self._conn = None
        elif self._file is not None:
            self._file.release(force=True)
            self._file = None
        elif self._thread_lock is not None:
            self._thread_lock.release()
            self._thread_lock = None

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
