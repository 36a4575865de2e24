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

import torch
from helpers import call, free_port, small_job, wait_for_job, wait_until_up

from adapruner.export import load_pruned


def test_serve_runs_a_job_end_to_end(tmp_path, roots):
    api, dashboard = free_port(), free_port()
    data = tmp_path / "data"
    env = {**os.environ, "ADAPRUNER_DATA_DIR": str(data), "ADAPRUNER_MODELS_ROOT": str(roots / "models"),
           "ADAPRUNER_TEXTS_ROOT": str(roots / "texts"), "ADAPRUNER_WORKER_POLL_SECONDS": "0.5"}
    env.pop("ADAPRUNER_API_TOKENS", None)
    env.pop("ADAPRUNER_DATABASE_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(api),
                               "--dashboard-port", str(dashboard), "--device", "cpu"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{api}"
    try:
        wait_until_up(f"{base}/healthz", server)
        token = (data / "api-token").read_text().strip()  # made on first start, readable by its owner only
        assert (data / "api-token").stat().st_mode & 0o077 == 0
        try:
            call(f"{base}/v1/jobs", small_job())
            raise AssertionError("a write without a token was accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        repaired = {"subset_size": [2, 6], "n_clusters": 3, "repairs": ["pool"]}  # every trial re-fits its cut
        status, body = call(f"{base}/v1/jobs", small_job(trials=5, space=repaired), token)
        assert status == 202
        job_id = json.loads(body)["id"]
        job = wait_for_job(base, job_id)
        assert job["status"] == "succeeded", job
        assert job["progress"]["finished"] == 5 and job["best"]["test_ppl"] > 1
        assert {b["baseline"] for b in job["baselines"]} == {"wanda-sp", "magnitude"}
        assert job["links"]["dashboard"].startswith(f"http://127.0.0.1:{dashboard}/dashboard/studies/")
        report = call(f"{base}/v1/jobs/{job_id}/report")[1].decode()
        assert "| parameters kept | repair |" in report
        best_row = next(line for line in report.splitlines() if line.startswith("| **best: trial"))
        assert ("off" if job["best"]["baseline"] else "pool, ridge") in best_row.split("|")[-2]

        status, archive = call(f"{base}/v1/jobs/{job_id}/model", timeout=60)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp_path / "download", filter="data")
        model, _ = load_pruned(tmp_path / "download" / "model")
        assert model.config.adapruner["trial"] == job["best"]["number"]
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()

        wait_until_up(f"http://127.0.0.1:{dashboard}/api/studies", server)
        studies = json.loads(call(f"http://127.0.0.1:{dashboard}/api/studies")[1])["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == job["study_name"]]
        detail = json.loads(call(f"http://127.0.0.1:{dashboard}/api/studies/{summary['study_id']}?after=0")[1])
        assert len(detail["trials"]) >= 5 and detail["artifacts"]
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=90)
    assert server.returncode == 0, out  # SIGTERM drains the worker and stops the dashboard cleanly


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
        assert job["links"]["dashboard"] is None and job["links"]["self"] == f"/v1/jobs/{job_id}"
        assert job["created_at"].endswith(("Z", "+00:00")) and job["finished_at"].endswith(("Z", "+00:00"))
        for path in (data / "adapruner.db", data / "artifacts"):
            assert path.stat().st_mode & 0o077 == 0, path
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=90)
    assert server.returncode == 0, out
