"""The job list's cost: progress from Optuna's tables in one query per page, against loading each study.

Fills a fresh database (SQLite file, and PostgreSQL when reachable) with ``--jobs`` jobs whose studies
hold ``--trials`` finished trials each (user attributes and ``--windows`` intermediate values, as a
search leaves them), then times, alternating in one run, a page of 20 jobs built the two ways:
``study_digests`` (what ``GET /v1/jobs`` does) and ``load_study`` + ``get_trials`` per job (what it did
before). Prints the median of ``--repeats`` pages each way and their ratio.

    python bench/job_list.py
    python bench/job_list.py --databases sqlite --jobs 40 --trials 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, bench/ comes first on the path, and bench/service.py would shadow the service package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
from sqlalchemy import create_engine, select, text  # noqa: E402

from adapruner.search.record import StudyKey, TrialKey
from service.db import Job, make_engine, session_factory, upgrade, utcnow  # noqa: E402
from service.jobs import load_study  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.views import StudyDigest, job_summary, study_digests  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def fill(url: str, n_jobs: int, n_trials: int, n_windows: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    upgrade(url)
    storage = optuna.storages.RDBStorage(url)
    db = session_factory(make_engine(url))()
    for j in range(n_jobs):
        name = f"bench-{j:03d}"
        study = optuna.create_study(storage=storage, study_name=name)
        study.set_user_attr(StudyKey.JOB, {"trials": n_trials})
        for t in range(n_trials):
            trial = study.ask()
            trial.suggest_float("x", 0, 1)
            trial.set_user_attr(TrialKey.CONFIG, {"metric": "taylor_first", "subset": list(range(16))})
            trial.set_user_attr(TrialKey.SECONDS, {"importance": 0.1, "validation": 2.0})
            for step in range(n_windows):
                trial.report(100.0 + step, step)
            study.tell(trial, 100.0 + t)
        db.add(Job(id=f"{j:032x}", name=name, status="running", spec={"trials": n_trials, "model": "m"},
                   owner=None, study_name=name, created_at=utcnow(), started_at=utcnow()))
    db.commit()
    db.close()
    storage.remove_session()


def page_by_query(db, jobs, settings):
    digests = study_digests(db, [j.study_name for j in jobs])
    return [job_summary(j, settings, digests.get(j.study_name)) for j in jobs]


def page_by_study(storage, jobs, settings):
    out = []
    for j in jobs:
        study = load_study(storage, j)
        out.append(job_summary(j, settings, StudyDigest.of(storage, study, study.get_trials(deepcopy=False))))
    return out


def measure(url: str, repeats: int) -> tuple[float, float]:
    settings = Settings(database_url=url, data_dir=tempfile.mkdtemp())
    storage = optuna.storages.RDBStorage(url)
    db = session_factory(make_engine(url))()
    jobs = db.scalars(select(Job).order_by(Job.created_at.desc()).limit(20)).all()
    by_query, by_study = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        a = page_by_query(db, jobs, settings)
        by_query.append(time.perf_counter() - start)
        start = time.perf_counter()
        b = page_by_study(storage, jobs, settings)
        by_study.append(time.perf_counter() - start)
        same = [(x.progress.finished, x.progress.running, x.progress.phase) for x in a]
        assert same == [(y.progress.finished, y.progress.running, y.progress.phase) for y in b]
    db.close()
    storage.remove_session()
    return statistics.median(by_query), statistics.median(by_study)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    for database in args.databases.split(","):
        if database == "sqlite":
            url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}"
        else:
            name = f"bench_job_list_{int(time.time())}"
            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f"CREATE DATABASE {name}"))
            url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
        fill(url, args.jobs, args.trials, args.windows)
        query, study = measure(url, args.repeats)
        print(f"{database}: a page of 20 of {args.jobs} jobs x {args.trials} trials: one query {query * 1000:.1f} ms, "
              f"each study loaded {study * 1000:.1f} ms, {study / query:.1f}x", flush=True)
        if database != "sqlite":
            with admin.connect() as connection:
                connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
            admin.dispose()


if __name__ == "__main__":
    main()
