"""A trial's life through storage errors, without a server: the heartbeat outlives failed beats, a tell waits
for the storage, a trial finished elsewhere meanwhile is dropped, and every FAIL carries its reason."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from adapruner.search import storage as storage_module
from adapruner.search.record import TrialKey
from adapruner.search.storage import Heartbeat, fail_dead_trials, finish_trial, mark_alive
from adapruner.search.study import run_trial


def outage(times: int):
    """A callable raising a storage error its first ``times`` calls."""
    calls = {"n": 0}

    def fail(*_args, **_kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))

    return fail, calls


@pytest.fixture
def storage(tmp_path):
    return RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=2,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))


@pytest.fixture
def study(storage):
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"x": 0.5})
    return study


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(storage_module, "RETRY_SECONDS", 0.01)


def test_the_heartbeat_outlives_failed_beats(storage, study, monkeypatch):
    trial = study.ask()
    beats, real = [], storage.record_heartbeat
    fail, calls = outage(2)

    def beat(trial_id):
        fail()
        beats.append(time.monotonic())
        real(trial_id)

    monkeypatch.setattr(storage, "record_heartbeat", beat)
    monkeypatch.setattr(storage_module, "RETRY_SECONDS", 0.2)
    with Heartbeat(storage, trial) as heartbeat:
        time.sleep(2.0)
        assert heartbeat.thread.is_alive()
    assert calls["n"] >= 3 and beats, "no beat after the storage came back"
    assert not heartbeat.thread.is_alive()


def test_a_tell_waits_for_the_storage(study, monkeypatch):
    trial = study.ask()
    fail, calls = outage(3)
    real = study.tell

    def tell(*args, **kwargs):
        fail()
        return real(*args, **kwargs)

    monkeypatch.setattr(study, "tell", tell)
    assert finish_trial(study, trial, TrialState.COMPLETE, 1.5)
    assert calls["n"] == 4
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].value == 1.5


def test_a_trial_failed_as_stale_by_another_process_is_dropped_quietly(storage, study):
    trial = study.ask()
    storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # another worker took it for dead
    assert finish_trial(study, trial, TrialState.COMPLETE, 1.5) is False
    assert study.trials[0].state == TrialState.FAIL


def test_a_trial_the_storage_failed_is_queued_again_and_not_the_jobs_fault(storage, study):
    trial = study.ask()
    mark_alive(storage, trial)
    fail, _ = outage(1)

    def objective(t):
        t.suggest_float("x", 0, 1)
        fail()

    assert run_trial(study, trial, objective, storage) == 0
    failed, again = study.trials
    assert failed.state == TrialState.FAIL and failed.user_attrs[TrialKey.FAIL_REASON].startswith("storage unavailable")
    assert again.state == TrialState.WAITING and again.params == {"x": 0.5}


def test_a_trial_that_fails_by_itself_is_counted_with_its_reason(storage, study):
    trial = study.ask()
    mark_alive(storage, trial)

    def objective(t):
        raise ValueError("the plan empties a layer")

    assert run_trial(study, trial, objective, storage) == 1
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[0].user_attrs[TrialKey.FAIL_REASON] == "ValueError: the plan empties a layer"
    assert len(study.trials) == 1  # not queued again


def test_a_stale_trial_is_failed_with_a_reason_and_queued_again(storage, study):
    trial = study.ask()
    mark_alive(storage, trial)
    time.sleep(3.5)  # past the grace period without a beat (the storage keeps whole seconds)
    fail_dead_trials(study)
    stale = study.trials[0]
    assert stale.state == TrialState.FAIL and "no heartbeat for 2 s" in stale.user_attrs[TrialKey.FAIL_REASON]
    assert study.trials[1].state == TrialState.WAITING


def test_a_completed_copy_does_not_keep_its_originals_fail_reason(storage, study):
    trial = study.ask()
    trial.set_user_attr(TrialKey.FAIL_REASON, "storage unavailable: copied from the original")
    assert finish_trial(study, trial, TrialState.COMPLETE, 2.0)
    assert study.trials[0].user_attrs[TrialKey.FAIL_REASON] is None


def test_the_heartbeat_thread_is_not_started_without_heartbeats(tmp_path):
    study = optuna.create_study(storage=RDBStorage(f"sqlite:///{tmp_path / 'n.db'}"))
    trial = study.ask()
    with Heartbeat(study._storage, trial) as heartbeat:
        assert not heartbeat.thread.is_alive()
    assert threading.active_count() >= 1


def test_an_outage_in_the_middle_of_a_trial_pauses_it_instead_of_failing_it(storage, study, monkeypatch):
    trial = study.ask()
    mark_alive(storage, trial)
    fail, calls = outage(3)
    real = trial.report

    def report(value, step):
        fail()
        real(value, step)

    monkeypatch.setattr(trial, "report", report)

    def objective(t):
        x = t.suggest_float("x", 0, 1)
        t.report(x, 0)
        return x

    assert run_trial(study, trial, objective, storage) == 0
    assert calls["n"] == 4 and len(study.trials) == 1
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].intermediate_values == {0: 0.5}
