"""Job persistence: one ``jobs`` table (SQLAlchemy 2) in the same database as Optuna's tables.

The schema is created by one explicit step, ``adapruner db upgrade`` (``adapruner serve`` runs it for
its embedded SQLite database), never by workers or the API, so concurrent processes never race to
create tables. The step runs Alembic's migrations (``service/migrations``; the revision applied is
kept in ``adapruner_alembic_version``, apart from Optuna's own ``alembic_version``), and a process
that finds an older (or no) schema says so instead of failing on a missing column.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from pathlib import Path

import optuna
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import JSON, DateTime, Integer, String, Text, create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from adapruner.search import SQLITE_BUSY_SECONDS, use_wal

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "adapruner_alembic_version"  # Optuna keeps its own revision in ``alembic_version``
LEGACY_VERSION_TABLE = "adapruner_schema"  # the hand-written versioning before Alembic (version 1 = 0001)


class JobStatus(enum.StrEnum):
    """Where a job is in its life: queued, running, then succeeded, failed or cancelled."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobStatus.queued, JobStatus.running)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """The service's declarative base: its own tables, apart from Optuna's."""


class Job(Base):
    """A submitted search job: its spec, owner, status and times; its studies live in Optuna's tables."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    name: Mapped[str | None] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    study_name: Mapped[str] = mapped_column(String(128), unique=True)
    best_trial: Mapped[int | None] = mapped_column(Integer)
    artifact_id: Mapped[str | None] = mapped_column(String(64))
    owner: Mapped[str | None] = mapped_column(String(32))  # id of the token that submitted it
    # What its worker is doing before the first trial ({"phase", "done", "total"}: loading, statistics, moments)
    phase: Mapped[dict | None] = mapped_column(JSON)


class SchemaError(RuntimeError):
    """The database's tables differ from what this version of the service expects."""


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        use_wal(url)  # readers (the API's polls) and the writer (a trial, a submission) never block each other
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS, "check_same_thread": False})

        # SQLite: let SQLAlchemy, not the driver, open transactions, so that a transaction asked
        # for with the execution option ``sqlite_immediate`` (a job claim) starts as a writer
        # (BEGIN IMMEDIATE) and holds SQLite's write lock from its first read.
        @event.listens_for(engine, "connect")
        def _no_driver_transactions(dbapi_connection, _record):
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(connection):
            immediate = connection.get_execution_options().get("sqlite_immediate", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Alembic looks at our tables only: the database also holds Optuna's, which Optuna migrates."""
    table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
    return table is None or table in Base.metadata.tables


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(url: str) -> str:
    """Create or upgrade the job tables (Alembic) and Optuna's tables; returns the schema revision.

    A database prepared before Alembic (a ``jobs`` table and ``adapruner_schema`` at version 1) is
    stamped at revision 0001 first, so it upgrades in place.
    """
    config = alembic_config(url)
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        if current_revision(engine) is None and {"jobs", LEGACY_VERSION_TABLE} <= tables:
            command.stamp(config, "0001")
        command.upgrade(config, "head")
        revision = current_revision(engine)
    finally:
        engine.dispose()
    # Optuna creates (and migrates) its own tables when its storage is first opened.
    optuna.storages.RDBStorage(url)
    return revision


def check_drift(url: str) -> None:
    """``alembic check``: the job tables as migrated match the models (:class:`SchemaError` if not)."""
    from alembic.util.exc import AutogenerateDiffsDetected

    try:
        command.check(alembic_config(url))
    except AutogenerateDiffsDetected as exc:
        raise SchemaError(f"the job tables differ from the models: {exc}") from None


def check_schema(engine: Engine) -> None:
    """Refuse to run on a database that ``adapruner db upgrade`` has not prepared."""
    where = engine.url.render_as_string(hide_password=True)
    revision = current_revision(engine)
    if revision is None:
        raise SchemaError(f"database {where} has no AdaPruner schema: run `adapruner db upgrade` first")
    if revision != head_revision():
        raise SchemaError(f"database schema is at revision {revision}, this AdaPruner needs {head_revision()}: "
                          "run `adapruner db upgrade`")
