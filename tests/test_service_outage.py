"""A database outage never fails a job: workers reach PostgreSQL through a TCP proxy the test cuts (the server
itself is never touched), three times in the middle of trials, with two workers on one job."""

from __future__ import annotations

import os
import threading
import time

from helpers import FlakyProxy, service_env, start_worker
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from test_service_workers import assert_exact, job_state, study_of, submit

from service.db import upgrade

# The outages below last about half the grace period after which a silent trial is taken for dead, as
# outages of 20-25 s do against the default 45 s; scaled down so that the test takes a minute, not ten.
# ADAPRUNER_TEST_OUTAGE_SECONDS=22 runs it at full scale, with the default heartbeat (15 s) and grace (45 s).
FULL_SCALE = os.environ.get("ADAPRUNER_TEST_OUTAGE_SECONDS")
HEARTBEAT = {} if FULL_SCALE else {"ADAPRUNER_HEARTBEAT_SECONDS": "1", "ADAPRUNER_GRACE_SECONDS": "8"}
OUTAGE_SECONDS = float(FULL_SCALE or 4.0)


def test_three_outages_mid_trial_with_two_workers_never_fail_the_job(postgres_url, tmp_path, roots, monkeypatch):
    upgrade(postgres_url)
    target = make_url(postgres_url)
    proxy = FlakyProxy((target.host or "127.0.0.1", target.port or 5432))
    through_proxy = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    env = service_env(tmp_path / "data", postgres_url, roots, **HEARTBEAT)
    job = submit(env, monkeypatch, trials=14, val_windows=48, seq_len=64, pool_size=12)
    worker_env = {**env, "ADAPRUNER_DATABASE_URL": through_proxy}
    workers = [start_worker(worker_env, "--once") for _ in range(2)]
    outputs: list[str] = []
    readers = [threading.Thread(target=lambda w=w: outputs.append(w.communicate(timeout=900)[0])) for w in workers]
    for reader in readers:
        reader.start()
    study = study_of(postgres_url, job)
    outages = 0
    deadline = time.time() + 600
    while outages < 3 and time.time() < deadline and any(w.poll() is None for w in workers):
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # a trial is under way: cut
            proxy.outage(OUTAGE_SECONDS)
            outages += 1
            time.sleep(1.0)
        else:
            time.sleep(0.05)
    for reader in readers:
        reader.join()
    proxy.close()
    assert outages == 3, f"the job ended after {outages} outages: make it longer"
    assert all(w.returncode == 0 for w in workers), outputs
    final = job_state(env, job["id"])
    assert final["status"] == "succeeded", (final, [o[-3000:] for o in outputs])
    assert not any(f"job {job['id']} failed" in o for o in outputs), outputs
    study = study_of(postgres_url, job)
    assert_exact(study, 14 + 2)  # and the two baselines
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs.get("fail_reason") for t in failed), [(t.number, t.user_attrs) for t in failed]
