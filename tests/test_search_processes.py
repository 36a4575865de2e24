"""`adapruner search` as separate processes: two on one study, a killed one resumed, and the study in
Optuna Dashboard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import optuna_dashboard
import pytest
from optuna.trial import TrialState

from adapruner.search.artifacts import artifact_store

FAST_HEARTBEAT = {"ADAPRUNER_HEARTBEAT_SECONDS": "1", "ADAPRUNER_GRACE_SECONDS": "4"}


def search(roots, storage, study, trials, tmp_path, *extra):
    argv = [sys.executable, "-m", "service.cli", "search", "--model", str(roots / "models" / "tiny"),
            "--calib", str(roots / "texts" / "toy"), "--pool-size", "12", "--seq-len", "32", "--val-windows", "32",
            "--test-windows", "6", "--subset-size", "2:6", "--clusters", "3", "--trials", str(trials),
            "--storage", storage, "--study", study, "--out", str(tmp_path / "out"),
            "--artifacts", str(tmp_path / "artifacts"), "--baselines", "wanda-sp", "--no-measure", *extra]
    env = {**os.environ, "ADAPRUNER_CACHE": str(tmp_path / "cache"), **FAST_HEARTBEAT}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_exact(study, budget):
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == budget
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_processes_share_one_study(backend, request, tmp_path, roots):
    storage = f"sqlite:///{tmp_path / 'runs.db'}" if backend == "sqlite" else request.getfixturevalue(
        "postgres_url")
    processes = [search(roots, storage, "shared", 30, tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    study = optuna.load_study(study_name="shared", storage=storage)
    assert_exact(study, 30 + 1)  # and the baseline
    workers = {t.user_attrs["worker"] for t in study.trials if "worker" in t.user_attrs}
    assert len(workers) == 2, workers
    assert sum(t.user_attrs.get("baseline") == "wanda-sp" for t in study.trials) == 1  # enqueued once


def test_a_killed_search_continues_when_run_again(tmp_path, roots):
    storage = f"sqlite:///{tmp_path / 'runs.db'}"
    first = search(roots, storage, "resumed", 12, tmp_path)
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and killed is None:
        try:
            study = optuna.load_study(study_name="resumed", storage=storage)
            finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
            if len(finished) >= 3 and any(t.state == TrialState.RUNNING for t in study.trials):
                # Freeze the process, then read which trial it is running: once frozen, the trial
                # cannot finish between the reading and the kill, however busy the machine is.
                os.kill(first.pid, signal.SIGSTOP)
                running = optuna.load_study(study_name="resumed", storage=storage).get_trials(
                    deepcopy=False, states=(TrialState.RUNNING,))
                if running:
                    killed = running[0].number
                else:  # it finished in the meantime: let it go on and look again
                    os.kill(first.pid, signal.SIGCONT)
        except KeyError:
            pass
        time.sleep(0.05)
    assert killed is not None, "the search never got going"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    again = search(roots, storage, "resumed", 12, tmp_path)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    study = optuna.load_study(study_name="resumed", storage=storage)
    assert_exact(study, 12 + 1)
    assert study.trials[killed].state == TrialState.FAIL
    assert any(t.system_attrs.get("failed_trial") == killed for t in study.trials)
    assert "report" in out
    assert (tmp_path / "out" / "report.md").is_file()


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_the_study_opens_in_optuna_dashboard(tmp_path, roots):
    storage = f"sqlite:///{tmp_path / 'runs.db'}"
    process = search(roots, storage, "shown", 5, tmp_path)
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out
    app = optuna_dashboard.wsgi(storage, artifact_store=artifact_store(tmp_path / "artifacts"))
    server = make_server("127.0.0.1", 0, app, handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        studies = json.load(urllib.request.urlopen(f"{base}/api/studies"))["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == "shown"]
        detail = json.load(urllib.request.urlopen(f"{base}/api/studies/{summary['study_id']}?after=0"))
    finally:
        server.shutdown()
    trials = detail["trials"]
    assert len(trials) >= 5
    searched = [t for t in trials if t["params"]]
    assert searched
    assert {"attn_share", "strength"} <= {p["name"] for p in searched[0]["params"]}
    keys = {a["key"] for t in trials for a in t["user_attrs"]}
    assert {"val_ppl", "config", "sizes", "seconds", "worker"} <= keys
    assert detail["artifacts"]
    assert detail["artifacts"][0]["filename"].endswith(".tar")
