"""Job persistence: one ``jobs`` table (SQLAlchemy 2) in the same database as Optuna's tables.

The schema is created by one explicit step, ``adapruner db upgrade`` (``adapruner serve`` runs it for
its embedded SQLite database), never by workers or the API, so concurrent processes never race to
create tables. The step is versioned: ``adapruner_schema`` records the version applied, and a process
that finds an older (or no) schema says so instead of failing on a missing column.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime

import optuna
from sqlalchemy import JSON, DateTime, Integer, String, Text, create_engine, event, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

SCHEMA_VERSION = 1


class JobStatus(enum.StrEnum):
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
    pass


class Job(Base):
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


class SchemaVersion(Base):
    __tablename__ = "adapruner_schema"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SchemaError(RuntimeError):
    pass


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

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


def upgrade(url: str) -> int:
    """Create or upgrade the job tables and Optuna's tables; returns the schema version."""
    engine = make_engine(url)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            if session.get(SchemaVersion, SCHEMA_VERSION) is None:
                session.add(SchemaVersion(version=SCHEMA_VERSION))
    finally:
        engine.dispose()
    # Optuna creates (and migrates) its own tables when its storage is first opened.
    optuna.storages.RDBStorage(url)
    return SCHEMA_VERSION


def check_schema(engine: Engine) -> None:
    """Refuse to run on a database that ``adapruner db upgrade`` has not prepared."""
    if not inspect(engine).has_table(SchemaVersion.__tablename__):
        raise SchemaError(f"database {engine.url.render_as_string(hide_password=True)} has no AdaPruner schema: "
                          "run `adapruner db upgrade` first")
    with Session(engine) as session:
        version = session.scalar(select(SchemaVersion.version).order_by(SchemaVersion.version.desc()))
    if version != SCHEMA_VERSION:
        raise SchemaError(f"database schema is version {version}, this AdaPruner needs {SCHEMA_VERSION}: "
                          "run `adapruner db upgrade`")
