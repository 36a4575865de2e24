"""A job run to its end by a real worker subprocess, on SQLite and on PostgreSQL, read over HTTP:
the job, its report, its downstream accuracy, its model download, and what may still be done with it."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from helpers import TOKEN, job_run_to_its_end, small_job

from adapruner.export import load_pruned

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def finished(request, tmp_path_factory, roots):
    """One job of 5 trials, submitted over HTTP and run by ``adapruner worker --once`` to its end."""
    folder = tmp_path_factory.mktemp(f"finished-{request.param}")
    url = f"sqlite:///{folder / 'service.db'}" if request.param == "sqlite" else request.getfixturevalue(
        "postgres_url")
    with job_run_to_its_end(folder, url, roots, small_job(trials=5, tasks=["books-lastword"], task_limit=2,
                                                                measure_cost=True, export_format="gguf",
                                                                gguf_type="f32")) as job:
        yield job


@pytest.fixture(scope="module")
def downloaded(finished):
    archive = finished.client.get(finished.job["links"]["model"], params={"filename": "best"})
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(finished.folder / "download", filter="data")
    return archive, load_pruned(finished.folder / "download" / "model")[0]


def test_the_worker_exits_cleanly(finished):
    assert finished.worker_code == 0, finished.worker_output[-3000:]


def test_the_job_succeeds(finished):
    assert finished.job["status"] == "succeeded", (finished.job, finished.worker_output[-3000:])


def test_the_job_finishes_its_budget(finished):
    assert finished.job["progress"]["finished"] == 5 + 2  # and one trial per baseline


def test_the_best_is_tested(finished):
    assert finished.job["best"]["test_ppl"] > 1


def test_the_job_shows_both_baselines(finished):
    assert {b["baseline"] for b in finished.job["baselines"]} == {"wanda-sp", "magnitude"}


def test_the_job_shows_the_unpruned_perplexity(finished):
    assert finished.job["unpruned"]["test"] > 1


def test_the_job_says_how_to_load_its_model(finished):
    assert finished.job["load"].startswith('AutoModelForCausalLM.from_pretrained("model"')


def test_the_job_shows_the_accuracy_of_the_unpruned_model_the_baselines_and_the_best(finished):
    assert list(finished.job["tasks"]["models"]) == ["unpruned", "wanda-sp", "magnitude", "best"]


def test_the_job_shows_the_share_of_the_unpruned_accuracy_the_best_keeps(finished):
    tasks = finished.job["tasks"]
    dense, best = tasks["models"]["unpruned"]["mean_acc"], tasks["models"]["best"]["mean_acc"]
    assert tasks["best_retained"] == (pytest.approx(best / dense) if dense else None)


def test_the_job_shows_what_the_pruned_models_buy(finished):
    assert list(finished.job["inference_cost"]["models"]) == ["unpruned", "wanda-sp", "magnitude", "best"]


def test_the_job_shows_what_the_best_buys_in_llama_cpp(finished):
    in_llama_cpp = finished.job["inference_cost"]["llama_cpp"]
    assert in_llama_cpp["quant"] == "q4_k_m" and list(in_llama_cpp["models"]) == ["unpruned", "best"]
    assert in_llama_cpp["rounds"] == 5 and in_llama_cpp["models"]["best"]["decode_tokens_per_s"] > 0
    report = finished.client.get(f"/v1/jobs/{finished.job['id']}/report").text
    assert "In llama.cpp, as q4_k_m GGUF files" in report


@pytest.mark.parametrize("line", ["baseline: wanda-sp", "Load the exported model", "## Downstream accuracy"])
def test_the_report_shows(finished, line):
    report = finished.client.get(finished.job["links"]["report"])
    assert report.status_code == 200
    assert line in report.text


def test_the_model_downloads_under_the_name_asked_for(downloaded):
    archive, _ = downloaded
    assert archive.status_code == 200
    assert 'filename="best.tar"' in archive.headers["content-disposition"]


def test_the_downloaded_model_is_the_best_trials(finished, downloaded):
    _, model = downloaded
    assert model.config.adapruner["trial"] == finished.job["best"]["number"]


def test_the_downloaded_model_runs(downloaded):
    _, model = downloaded
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 320)


def test_the_model_downloads_as_a_gguf_file_llama_cpp_runs_with_the_same_logits(finished, downloaded):
    from test_gguf_export import assert_same_logits

    answer = finished.client.get(finished.job["links"]["model"], params={"format": "gguf", "filename": "best"})
    assert answer.status_code == 200 and answer.content[:4] == b"GGUF"
    assert 'filename="best.gguf"' in answer.headers["content-disposition"]
    path = finished.folder / "best.gguf"
    path.write_bytes(answer.content)
    assert_same_logits(downloaded[1], path)


def test_a_model_format_the_service_does_not_give_is_422(finished):
    answer = finished.client.get(finished.job["links"]["model"], params={"format": "zip"})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", "format"]


def test_a_finished_job_cannot_be_cancelled(finished):
    assert finished.client.post(f"/v1/jobs/{finished.job['id']}/cancel", headers=AUTH).status_code == 409
