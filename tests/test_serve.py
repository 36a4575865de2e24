"""`adapruner serve`, the embedded default, as a user runs it: one command starts the API, a local
worker and Optuna Dashboard on SQLite; a job submitted over HTTP runs to the end, its model downloads
and loads, and the dashboard shows its study with the artifact."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import call, free_port, small_job, wait_for_job, wait_until_up

from adapruner.export import load_pruned


@dataclass
class Served:
    base: str
    dashboard: str
    data: Path
    job: dict
    report: str
    model: torch.nn.Module


@pytest.fixture(scope="module")
def served(tmp_path_factory, roots):
    """``adapruner serve`` on a fresh data folder, and a job of 5 repaired trials run to its end through it.
    Stopping it (SIGTERM) must drain the worker and the dashboard cleanly: checked when the module ends."""
    folder = tmp_path_factory.mktemp("serve")
    api, dashboard = free_port(), free_port()
    data = folder / "data"
    env = {**os.environ, "ADAPRUNER_DATA_DIR": str(data), "ADAPRUNER_MODELS_ROOT": str(roots / "models"),
           "ADAPRUNER_TEXTS_ROOT": str(roots / "texts"), "ADAPRUNER_WORKER_POLL_SECONDS": "0.5"}
    env.pop("ADAPRUNER_API_TOKENS", None)
    env.pop("ADAPRUNER_DATABASE_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(api),
                               "--dashboard-port", str(dashboard), "--device", "cpu"], env=env, cwd=folder,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{api}"
    try:
        wait_until_up(f"{base}/healthz", server)
        token = (data / "api-token").read_text().strip()  # made on first start
        repaired = {"subset_size": [2, 6], "n_clusters": 3, "repairs": ["pool"]}  # every trial re-fits its cut
        _, body = call(f"{base}/v1/jobs", small_job(trials=5, space=repaired), token)
        job = wait_for_job(base, json.loads(body)["id"])
        report = call(f"{base}/v1/jobs/{job['id']}/report")[1].decode()
        _, archive = call(f"{base}/v1/jobs/{job['id']}/model", timeout=60)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder / "download", filter="data")
        model, _ = load_pruned(folder / "download" / "model")
        wait_until_up(f"http://127.0.0.1:{dashboard}/api/studies", server)
        yield Served(base, f"http://127.0.0.1:{dashboard}", data, job, report, model)
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=90)
    assert server.returncode == 0, out


def test_the_token_file_is_its_owners_alone(served):
    assert (served.data / "api-token").stat().st_mode & 0o077 == 0


def test_a_write_without_a_token_is_refused(served):
    with pytest.raises(urllib.error.HTTPError) as refused:
        call(f"{served.base}/v1/jobs", small_job())
    assert refused.value.code == 401


def test_the_job_succeeds(served):
    assert served.job["status"] == "succeeded", served.job


def test_the_job_finishes_its_budget(served):
    assert served.job["progress"]["finished"] == 5 + 2  # and one trial per baseline


def test_the_best_is_tested(served):
    assert served.job["best"]["test_ppl"] > 1


def test_the_job_shows_both_baselines(served):
    assert {b["baseline"] for b in served.job["baselines"]} == {"wanda-sp", "magnitude"}


def test_the_job_links_its_dashboard_study(served):
    assert served.job["links"]["dashboard"].startswith(f"{served.dashboard}/dashboard/studies/")


def test_the_report_has_a_repair_column(served):
    assert "| parameters kept | repair |" in served.report


def test_the_report_shows_the_best_trials_repair(served):
    best_row = next(line for line in served.report.splitlines() if line.startswith("| **best: trial"))
    assert ("off" if served.job["best"]["baseline"] else "pool, ridge") in best_row.split("|")[-2]


def test_the_downloaded_model_is_the_best_trials(served):
    assert served.model.config.adapruner["trial"] == served.job["best"]["number"]


def test_the_downloaded_model_runs(served):
    assert torch.isfinite(served.model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()


def test_the_dashboard_shows_the_study_with_its_trials_and_artifact(served):
    studies = json.loads(call(f"{served.dashboard}/api/studies")[1])["study_summaries"]
    (summary,) = [s for s in studies if s["study_name"] == served.job["study_name"]]
    detail = json.loads(call(f"{served.dashboard}/api/studies/{summary['study_id']}?after=0")[1])
    assert len(detail["trials"]) >= 5
    assert detail["artifacts"]


def worker_pids(server: subprocess.Popen) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(server.pid), "-f", "service.cli worker"], capture_output=True, text=True)
    return {int(pid) for pid in out.stdout.split()}


def test_serve_replaces_a_dead_worker_keeps_its_files_private_and_links_no_absent_dashboard(tmp_path,
                                                                                            roots):
    api = free_port()
    data = tmp_path / "data"
    env = {**os.environ, "ADAPRUNER_DATA_DIR": str(data), "ADAPRUNER_MODELS_ROOT": str(roots / "models"),
           "ADAPRUNER_TEXTS_ROOT": str(roots / "texts"), "ADAPRUNER_WORKER_POLL_SECONDS": "0.5",
           "ADAPRUNER_WORKER_CHECK_SECONDS": "0.5", "ADAPRUNER_API_TOKENS": "serve-token"}
    env.pop("ADAPRUNER_DATABASE_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(api),
                               "--dashboard-port", "0", "--device", "cpu"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{api}"
    try:
        wait_until_up(f"{base}/healthz", server)
        (first,) = worker_pids(server)
        os.kill(first, signal.SIGKILL)
        deadline = time.time() + 60
        while time.time() < deadline and worker_pids(server) in (set(), {first}):
            time.sleep(0.2)
        assert len(worker_pids(server) - {first}) == 1, "the dead worker was not replaced"
        status, body = call(f"{base}/v1/jobs", small_job(trials=3), "serve-token")
        job_id = json.loads(body)["id"]
        job = wait_for_job(base, job_id)
        assert job["status"] == "succeeded", job  # run by the replacement
        assert job["links"]["dashboard"] is None
        assert job["links"]["self"] == f"/v1/jobs/{job_id}"
        assert job["created_at"].endswith(("Z", "+00:00"))
        assert job["finished_at"].endswith(("Z", "+00:00"))
        for path in (data / "adapruner.db", data / "artifacts"):
            assert path.stat().st_mode & 0o077 == 0, path
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=90)
    assert server.returncode == 0, out


@pytest.mark.parametrize("command", [["api"], ["worker", "--once"]])
def test_api_and_worker_write_private_files_as_serve_does(tmp_path, monkeypatch, command):
    """The documented multi-machine deployment (`adapruner api` + `adapruner worker`) keeps what it writes
    to its user, as `serve` does (umask 077, set before anything is written)."""
    import uvicorn

    from service.cli import main
    from service.db import upgrade

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    masks = []
    monkeypatch.setattr(os, "umask", lambda mask: masks.append(mask) or 0o022)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)  # the API's server is not started
    assert main([*command, "--db", url, "--data-dir", str(tmp_path / "data")]) == 0
    assert masks and masks[0] == 0o077
