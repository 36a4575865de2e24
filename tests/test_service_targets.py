"""A job of several targets over HTTP, run to its end by a real worker subprocess: one study per target,
each target's model downloadable by its target, the trade-off report."""

from __future__ import annotations

import io
import tarfile

import pytest
from helpers import TOKEN, job_run_to_its_end, small_job

from adapruner.export import load_pruned

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def several(tmp_path_factory, roots):
    """One job of two targets (0.1 and 0.3) of 3 trials each, run by ``adapruner worker --once``. On SQLite
    only: what differs from a one-target job is the same SQL on both databases, and the one-target job
    (test_service_finished_job.py) runs on both."""
    folder = tmp_path_factory.mktemp("targets")
    url = f"sqlite:///{folder / 'service.db'}"
    with job_run_to_its_end(folder, url, roots, small_job(trials=3, target=[0.1, 0.3])) as job:
        yield job


def download(several, target):
    answer = several.client.get(several.job["links"]["model"], params={"target": target})
    assert answer.status_code == 200, answer.text
    folder = several.folder / f"download-{target}"
    with tarfile.open(fileobj=io.BytesIO(answer.content)) as tar:
        tar.extractall(folder, filter="data")
    return load_pruned(folder / "model")[0]


def test_the_job_of_several_targets_succeeds(several):
    assert (several.worker_code, several.job["status"]) == (0, "succeeded"), several.worker_output[-3000:]


def test_each_target_has_its_study(several):
    assert [t["study_name"].rsplit("-", 1)[1] for t in several.job["targets"]] == ["r0.1", "r0.3"]


def test_each_target_has_a_best_and_a_model(several):
    assert [(t["target"], t["best"] is not None, t["has_model"]) for t in several.job["targets"]] == \
        [(0.1, True, True), (0.3, True, True)]


def test_the_progress_counts_every_targets_trials(several):
    progress = several.job["progress"]
    assert (progress["finished"], progress["budget"]) == (10, 10)  # 3 searched and 2 baselines per target


def test_the_job_list_counts_every_targets_trials(several):
    listed = several.client.get("/v1/jobs").json()["items"][0]
    assert listed["progress"]["finished"] == 10


def test_each_targets_model_downloads_by_its_ratio(several):
    models = {target["target"]: download(several, target["target"]) for target in several.job["targets"]}
    assert [models[t["target"]].config.adapruner["trial"] for t in several.job["targets"]] == \
        [t["best"]["number"] for t in several.job["targets"]]


def test_the_larger_target_downloads_the_smaller_model(several):
    sizes = [sum(p.numel() for p in download(several, r).parameters()) for r in (0.1, 0.3)]
    assert sizes[0] > sizes[1]


def test_a_model_without_a_target_is_refused_naming_the_targets(several):
    answer = several.client.get(several.job["links"]["model"])
    assert (answer.status_code, answer.json()["detail"][0]["loc"]) == (422, ["query", "target"])


def test_a_target_the_job_lacks_is_refused(several):
    answer = several.client.get(several.job["links"]["model"], params={"target": 0.5})
    assert "no target 0.5" in answer.json()["detail"][0]["msg"]


def test_the_trials_say_their_target(several):
    trials = several.client.get(several.job["links"]["trials"]).json()["items"]
    assert sorted({t["target"] for t in trials}) == [0.1, 0.3]


def test_the_report_draws_the_tradeoff(several):
    assert "# Size, speed and quality" in several.client.get(several.job["links"]["report"]).text


def test_a_target_listed_twice_is_refused(several):
    answer = several.client.post("/v1/jobs", json=small_job(target=[0.2, 0.2]), headers=AUTH)
    assert (answer.status_code, answer.json()["detail"][0]["loc"]) == (422, ["body", "target"])
