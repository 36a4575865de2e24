"""Fixtures for the service tests: databases (SQLite and a fresh PostgreSQL database per run),
settings with allowed model/text roots holding the tiny model and a local corpus, and workers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import make_documents
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

TOKEN = "test-token-1234"
PG_ADMIN_URL = os.environ.get("ADAPRUNER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_url_or_skip() -> str:
    """A fresh database on the machine's PostgreSQL; skipped only when it is down and CI is unset."""
    try:
        admin = create_engine(PG_ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                              connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {PG_ADMIN_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN_URL} (and CI is unset): {str(exc).splitlines()[0]}")
    name = f"adapruner_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_postgres(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


@pytest.fixture(scope="session")
def postgres_url():
    url = postgres_url_or_skip()
    yield url
    drop_postgres(url)


@pytest.fixture(scope="session")
def roots(tmp_path_factory, tiny_model_dir):
    """models_root with the tiny model (a copy: a symlink out of the root would be refused) and texts_root."""
    base = tmp_path_factory.mktemp("roots")
    shutil.copytree(tiny_model_dir, base / "models" / "tiny")
    corpus = base / "texts" / "toy"
    corpus.mkdir(parents=True)
    for i, doc in enumerate(make_documents(40, words_per_doc=200)):
        (corpus / f"doc{i:02d}.txt").write_text(doc)
    return base


def service_env(data_dir: Path, db_url: str, roots: Path, **extra: str) -> dict[str, str]:
    return {
        "ADAPRUNER_DATA_DIR": str(data_dir), "ADAPRUNER_DATABASE_URL": db_url, "ADAPRUNER_API_TOKENS": TOKEN,
        "ADAPRUNER_MODELS_ROOT": str(roots / "models"), "ADAPRUNER_TEXTS_ROOT": str(roots / "texts"),
        "ADAPRUNER_WORKER_POLL_SECONDS": "0.5", **extra,
    }


def small_job(**overrides) -> dict:
    job = {"name": "tiny-job", "model": "tiny", "calibration": ["toy"], "ratio": 0.2, "trials": 6, "pool_size": 12,
           "seq_len": 32, "val_windows": 12, "test_windows": 6, "baselines": ["wanda-sp", "magnitude"],
           "space": {"subset_size": [2, 6], "n_clusters": 3}}
    return {**job, **overrides}


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
