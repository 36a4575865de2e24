"""The job tables are migrated by Alembic, on SQLite and on PostgreSQL: a fresh database, a database
prepared by the hand-written versioning before Alembic (upgraded in place, its jobs kept), no drift
between the migrations and the models, and a clear error for a process that finds no schema."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Column, DateTime, Integer, MetaData, Table, inspect, select
from sqlalchemy.orm import Session

from service.cli import main
from service.db import (
    VERSION_TABLE,
    Job,
    SchemaError,
    check_drift,
    check_schema,
    current_revision,
    head_revision,
    make_engine,
    upgrade,
)


@pytest.fixture
def url(fresh_database):
    return fresh_database


ADDED_SINCE_0001 = ("phase",)  # columns of the jobs table that later migrations added


def legacy_database(url: str) -> None:
    """What ``adapruner db upgrade`` made before Alembic: the jobs table as it was then (``create_all`` of the
    models of that time), version 1 recorded, and one job."""
    engine = make_engine(url)
    legacy = MetaData()
    version = Table("adapruner_schema", legacy, Column("version", Integer, primary_key=True),
                    Column("applied_at", DateTime(timezone=True)))
    jobs = Table("jobs", legacy, *[c.copy() for c in Job.__table__.columns if c.name not in ADDED_SINCE_0001])
    legacy.create_all(engine)
    with Session(engine) as session, session.begin():
        session.execute(version.insert().values(version=1, applied_at=datetime.now(UTC)))
        session.execute(jobs.insert().values(id="a" * 32, spec={"model": "tiny"}, study_name="old-study",
                                             status="queued", created_at=datetime.now(UTC)))
    engine.dispose()


def test_a_fresh_database_is_migrated_to_the_head(url):
    assert upgrade(url) == head_revision()
    engine = make_engine(url)
    try:
        assert {"jobs", VERSION_TABLE} <= set(inspect(engine).get_table_names())
        assert "alembic_version" in inspect(engine).get_table_names()  # Optuna's, beside ours
        check_schema(engine)
    finally:
        engine.dispose()
    check_drift(url)  # alembic check: the migrations build exactly the models' tables
    assert upgrade(url) == head_revision()  # a second upgrade changes nothing


def test_a_database_from_before_alembic_upgrades_in_place(url):
    legacy_database(url)
    engine = make_engine(url)
    try:
        assert current_revision(engine) is None
        assert upgrade(url) == head_revision()
        tables = set(inspect(engine).get_table_names())
        assert "adapruner_schema" not in tables
        with Session(engine) as session:
            assert session.scalars(select(Job.study_name)).all() == ["old-study"]
    finally:
        engine.dispose()
    check_drift(url)


def test_a_process_on_an_unprepared_database_is_told_what_to_run(url):
    engine = make_engine(url)
    try:
        with pytest.raises(SchemaError, match="run `adapruner db upgrade` first"):
            check_schema(engine)
    finally:
        engine.dispose()


def test_drift_between_tables_and_models_is_found(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_jobs_status")
    engine.dispose()
    with pytest.raises(SchemaError, match="differ from the models"):
        check_drift(url)


def test_db_command_upgrades_and_checks(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["db", "upgrade", "--db", url, "--data-dir", str(tmp_path / "data")]) == 0
    assert f"at schema revision {head_revision()}" in capsys.readouterr().out
    assert main(["db", "check", "--db", url, "--data-dir", str(tmp_path / "data")]) == 0
    assert "match the models" in capsys.readouterr().out

