"""Workers under stress: a worker killed mid-trial, and three workers sharing one PostgreSQL job."""

from __future__ import annotations

import os
import signal
import time

import optuna
import pytest
from fastapi.testclient import TestClient
from helpers import TOKEN, service_env, small_job, start_worker
from optuna.trial import TrialState

from service.app import create_app
from service.db import upgrade
from service.settings import Settings

AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST_HEARTBEAT = {"ADAPRUNER_HEARTBEAT_SECONDS": "1", "ADAPRUNER_GRACE_SECONDS": "4"}


def submit(env, monkeypatch, **job):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with TestClient(create_app(Settings())) as client:
        response = client.post("/v1/jobs", json=small_job(**job), headers=AUTH)
        assert response.status_code == 202, response.text
        return response.json()


def job_state(env, job_id):
    with TestClient(create_app(Settings())) as client:
        return client.get(f"/v1/jobs/{job_id}").json()


def study_of(url, job):
    return optuna.load_study(study_name=job["study_name"], storage=url)


def assert_exact(study, budget):
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))  # nothing duplicated or lost
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == budget
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_killed_worker_trial_is_failed_and_retried(backend, request, tmp_path, roots, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    env = service_env(tmp_path / "data", url, roots, **FAST_HEARTBEAT)
    job = submit(env, monkeypatch, trials=8, val_windows=48)
    victim = start_worker(env)
    study = study_of(url, job)
    deadline = time.time() + 300
    while time.time() < deadline:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            break
        time.sleep(0.05)
    assert running, "the worker never started a trial"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed = running[0].number
    rescuer = start_worker(env, "--once")
    out, _ = rescuer.communicate(timeout=600)
    assert rescuer.returncode == 0, out
    final = job_state(env, job["id"])
    assert final["status"] == "succeeded", final
    study = study_of(url, job)
    assert study.trials[killed].state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == study.trials[killed].params
    assert_exact(study, 8 + 2)  # and the two baselines


def test_four_workers_share_one_postgres_job_and_never_repeat_a_configuration(postgres_url, tmp_path, roots,
                                                                              monkeypatch):
    upgrade(postgres_url)
    env = service_env(tmp_path / "data", postgres_url, roots)
    job = submit(env, monkeypatch, trials=24, val_windows=48, baselines=[])
    workers = [start_worker(env, "--once") for _ in range(4)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    assert job_state(env, job["id"])["status"] == "succeeded"
    study = study_of(postgres_url, job)
    assert_exact(study, 24)
    contributors = {t.user_attrs["worker"] for t in study.trials if t.state != TrialState.FAIL}
    assert len(contributors) == 4, contributors
    configurations = [tuple(sorted(t.params.items())) for t in study.trials if t.state != TrialState.FAIL]
    assert len(set(configurations)) == len(configurations)  # the workers' samplers share the job's seed
