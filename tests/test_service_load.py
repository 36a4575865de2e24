"""The service under load and faults: a burst of submissions and polls while a trial runs (SQLite and
PostgreSQL), a database that drops every connection mid-job, a job cancelled in its statistics pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import optuna
import pytest
from fastapi.testclient import TestClient
from helpers import (
    TOKEN,
    drop_postgres,
    free_port,
    postgres_url_or_skip,
    service_env,
    small_job,
    start_worker,
    wait_until_up,
)
from optuna.trial import TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from adapruner.errors import Stopped
from service import jobs
from service.app import create_app
from service.db import upgrade
from service.settings import Settings
from service.worker import Worker

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def database(fresh_database):
    """A database of this test's own: it counts every job and study in it."""
    return fresh_database


def start_api(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1", "--port",
                                str(port)], env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_until_up(f"{base}/healthz", process)
    return process, base


def wait_for(condition, seconds: float = 300, what: str = "the condition"):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} never held")


def test_a_burst_of_submissions_and_polls_while_a_trial_runs(database, tmp_path, roots):
    upgrade(database)
    env = service_env(tmp_path / "data", database, roots)
    api, base = start_api(env)
    worker = start_worker(env)
    statuses: list[int] = []
    try:
        with httpx.Client(base_url=base, headers=AUTH, timeout=120) as client:
            first = client.post("/v1/jobs", json=small_job(trials=6, val_windows=48)).json()
            wait_for(lambda: client.get(f"/v1/jobs/{first['id']}").json()["progress"]["running"], 300,
                     "a running trial")

            def request(i: int) -> int:
                if i % 4 == 0:
                    return client.post("/v1/jobs", json=small_job(name=f"burst-{i}", trials=2)).status_code
                path = ("/v1/jobs", f"/v1/jobs/{first['id']}", f"/v1/jobs/{first['id']}/trials")[i % 4 - 1]
                return client.get(path).status_code

            with ThreadPoolExecutor(8) as pool:  # 40 submissions and 120 polls, 8 at a time
                statuses = list(pool.map(request, range(160)))
            done = wait_for(lambda: (j := client.get(f"/v1/jobs/{first['id']}").json())["status"] != "running"
                            and j["status"] != "queued" and j, 600, "the first job's end")
            listed = client.get("/v1/jobs", params={"limit": 100}).json()
    finally:
        worker.send_signal(signal.SIGTERM)
        api.terminate()
        worker.wait(60)
        api.wait(60)
    assert sorted(set(statuses)) == [200, 202], statuses
    assert statuses.count(202) == 40
    assert done["status"] == "succeeded", done
    assert listed["total"] == 41
    # no trial failed, and no study was left without its job (or a job without its study)
    storage = optuna.storages.RDBStorage(database)
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    assert {j["study_name"] for j in listed["items"]} == set(studies)
    for name in studies:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        assert not [t for t in trials if t.state == TrialState.FAIL], name


def terminate_connections(url: str) -> int:
    """What a database restart does to its clients: every other session of the database is killed."""
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
    engine.dispose()
    return killed


@pytest.fixture
def postgres_url():
    url = postgres_url_or_skip()
    yield url
    drop_postgres(url)


def test_a_job_survives_its_database_dropping_every_connection(postgres_url, tmp_path, roots,
                                                               monkeypatch):
    upgrade(postgres_url)
    env = service_env(tmp_path / "data", postgres_url, roots, ADAPRUNER_HEARTBEAT_SECONDS="1",
                      ADAPRUNER_GRACE_SECONDS="4")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with TestClient(create_app(Settings())) as client:
        job = client.post("/v1/jobs", json=small_job(trials=8, val_windows=48), headers=AUTH).json()
    worker = start_worker(env, "--once")
    # pre-ping: the test's own connections are dropped too
    storage = optuna.storages.RDBStorage(postgres_url, engine_kwargs={"pool_pre_ping": True})
    study = optuna.load_study(study_name=job["study_name"], storage=storage)
    drops = 0
    for target in (2, 5):  # drop every connection twice, each time while a trial runs
        wait_for(lambda t=target: len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                   TrialState.PRUNED))) >= t
                 and study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), 300, f"trial {target}")
        drops += terminate_connections(postgres_url)
    out, _ = worker.communicate(timeout=600)
    assert drops >= 2
    assert worker.returncode == 0, out
    with TestClient(create_app(Settings())) as client:
        final = client.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "succeeded", (final, out[-3000:])
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 8 + 2  # and the two baselines
    assert {"wanda-sp", "magnitude"} <= {t.user_attrs.get("baseline") for t in finished}


def test_cancelling_stops_the_statistics_pass_between_samples(tmp_path, roots, monkeypatch):
    url = f"sqlite:///{tmp_path / 'service.db'}"
    upgrade(url)
    for key, value in service_env(tmp_path / "data", url, roots).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json=small_job(pool_size=64), headers=AUTH).json()["id"]
        worker = Worker(settings)
        with worker.sessions() as db:
            job = jobs.claim_job(db, worker.storage, settings)
        steps = []
        statistics_started = threading.Event()

        def cancel_once_started():
            statistics_started.wait(120)
            client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)

        recorder = worker._phase_recorder(job)

        def on_step(phase, done, total):
            steps.append((phase, done))
            if phase == "pool statistics" and done == 3:
                assert client.get(f"/v1/jobs/{job_id}").json()["progress"]["phase"].startswith("pool statistics ")
                statistics_started.set()
                canceller.join()
            recorder(phase, done, total)

        canceller = threading.Thread(target=cancel_once_started)
        canceller.start()
        monkeypatch.setattr(worker, "_phase_recorder", lambda _job: on_step)
        worker.serve(job)  # returns, having stopped: no exception, no failure recorded
        final = client.get(f"/v1/jobs/{job_id}").json()
    assert final["status"] == "cancelled"
    assert final["error"] is None
    statistics = [done for phase, done in steps if phase == "pool statistics"]
    assert statistics == [0, 1, 2, 3]  # it stopped at the first step after the cancel
    assert ("loading model", 0) in steps
    assert worker._loaded is None
    with pytest.raises(Stopped):
        recorder("pool statistics", 4, 64)
