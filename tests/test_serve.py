"""`adapruner serve`, the embedded default, as a user runs it: one command starts the API, a local
worker and Optuna Dashboard on SQLite; a job submitted over HTTP runs to the end, its model downloads
and loads, and the dashboard shows its study with the artifact."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request

import torch
from service_fixtures import roots, small_job  # noqa: F401

from adapruner.export import load_pruned


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None, token: str | None = None, timeout: float = 30):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as r:
        return r.status, r.read()


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            call(url)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    raise AssertionError(f"{url} never answered")


def test_serve_runs_a_job_end_to_end(tmp_path, roots):  # noqa: F811
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
        deadline = time.time() + 300
        while time.time() < deadline:
            job = json.loads(call(f"{base}/v1/jobs/{job_id}")[1])
            if job["status"] not in ("queued", "running"):
                break
            time.sleep(0.5)
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
