"""The HTTP API through TestClient, on SQLite and on PostgreSQL: auth, validation, policy, 404,
cancel, progress (a job run to its end by a worker: test_service_finished_job.py)."""

from __future__ import annotations

import re
import time

import optuna
import pytest
from fastapi.testclient import TestClient
from helpers import TOKEN, service_env, small_job
from optuna.trial import TrialState
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.orm import Session

from service.app import create_app
from service.db import Job, make_engine, upgrade, utcnow
from service.jobs import record_phase
from service.schemas import JobCreate
from service.settings import Settings

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path, roots):
    url = f"sqlite:///{tmp_path / 'service.db'}" if request.param == "sqlite" else request.getfixturevalue(
        "postgres_url")
    upgrade(url)
    env = service_env(tmp_path / "data", url, roots)
    return env


@pytest.fixture
def client(backend, monkeypatch):
    for key, value in backend.items():
        monkeypatch.setenv(key, value)
    with TestClient(create_app(Settings())) as c:
        yield c


def submit(client, **overrides):
    return client.post("/v1/jobs", json=small_job(**overrides), headers=AUTH)


def test_health_and_docs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert "/v1/jobs" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_work_offline(client, page):
    html = client.get(page).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets, assets
    assert not [a for a in assets if "://" in a or a.startswith("//")], assets  # no CDN
    for asset in assets:
        assert client.get(asset).status_code == 200, asset


def test_writes_need_a_valid_token(client):
    assert client.post("/v1/jobs", json=small_job()).status_code == 401
    assert client.post("/v1/jobs", json=small_job(), headers={"Authorization": "Bearer nope"}).status_code == 401
    created = submit(client)
    assert created.status_code == 202
    job_id = created.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 401
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # reads are public by default


def test_reads_can_be_closed(backend, monkeypatch):
    for key, value in {**backend, "ADAPRUNER_PUBLIC_READS": "false"}.items():
        monkeypatch.setenv(key, value)
    with TestClient(create_app(Settings())) as c:
        assert c.get("/v1/jobs").status_code == 401
        assert c.get("/v1/jobs", headers=AUTH).status_code == 200


def test_submit_answers_202_with_location_and_queued_baselines(client):
    response = submit(client)
    body = response.json()
    assert response.status_code == 202
    assert response.headers["Location"] == f"/v1/jobs/{body['id']}"
    assert body["status"] == "queued"
    assert body["progress"]["budget"] == 8  # 6 searched trials and one run of each of 2 baselines
    assert body["progress"]["finished"] == 0
    assert body["links"]["dashboard"].startswith("http://127.0.0.1:8081/dashboard/studies/")
    assert body["spec"]["model"] == "tiny"
    assert body["spec"]["calibration"] == ["toy"]  # no server paths shown
    assert body["spec"]["finetune"] is None
    trials = client.get(body["links"]["trials"]).json()["items"]
    assert [t["baseline"] for t in trials] == ["wanda-sp", "magnitude"]
    assert trials[0]["state"] == "waiting"
    listed = client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()
    assert body["id"] in [j["id"] for j in listed["items"]]
    assert listed["limit"] == 100


def test_the_job_list_shows_the_progress_the_job_shows(client, backend):
    """The list reads the trials' progress from Optuna's tables in one query, the job from its study; the phase
    before the first trial, from the job's row."""
    url = backend["ADAPRUNER_DATABASE_URL"]
    job = submit(client).json()
    storage = optuna.storages.RDBStorage(url)
    study = optuna.load_study(study_name=job["study_name"], storage=storage)

    def listed_and_shown():
        items = client.get("/v1/jobs", params={"limit": 100}).json()["items"]
        return next(j for j in items if j["id"] == job["id"])["progress"], client.get(f"/v1/jobs/{job['id']}").json()[
            "progress"]

    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job["id"]).values(status="running", started_at=utcnow()))
    with Session(engine) as db:
        record_phase(db, job["id"], "pool statistics", 3, 12)  # as the worker does
    listed, shown = listed_and_shown()
    assert listed == shown
    assert listed["phase"] == "pool statistics 3/12"
    for state in (TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, None):
        trial = study.ask()
        if state is not None:
            study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    listed, shown = listed_and_shown()
    eta_listed, eta_shown = listed.pop("eta_seconds"), shown.pop("eta_seconds")
    assert listed == shown
    assert eta_listed == pytest.approx(eta_shown, abs=5)  # read a moment apart
    assert (listed["finished"], listed["stopped_early"], listed["failed"], listed["running"]) == (3, 1, 1, 1)
    assert listed["phase"] == "trial 4/8"  # 6 searched and 2 baseline runs
    assert eta_listed > 0
    engine.dispose()
    storage.remove_session()


@pytest.mark.parametrize(("change", "status", "field", "message"), [
    ({"target": -0.2}, 422, "target", "greater than 0"),
    ({"target": 1.0}, 422, "target", "less than 1"),
    ({"target": 0}, 422, "target", "greater than 0"),
    ({"target": -5}, 422, "target", "greater than or equal to 1"),
    ({"target": 28021248.5}, 422, "target", "less than 1"),
    ({"trials": 10**9}, 422, "trials", "at most 500"),
    ({"pool_size": 100000}, 422, "pool_size", "at most 256"),
    ({"sampler": "cmaes"}, 422, "sampler", "Input should be"),
    ({"name": "../../etc/passwd"}, 422, "name", "String should match pattern"),
    ({"model": "../../etc"}, 403, "model", "outside the allowed models folder"),
    ({"model": "/etc"}, 403, "model", "outside the allowed models folder"),
    ({"model": "tiny/../../texts/toy"}, 403, "model", "outside the allowed models folder"),
    ({"model": "meta-llama/Llama-2-7b-hf"}, 403, "model", "not on this server's allow-list"),
    ({"model": "gpt-5"}, 422, "model", "unknown model"),
    ({"calibration": ["/etc/passwd"]}, 403, "calibration", "outside the allowed texts folder"),
    ({"tasks": ["piqa"]}, 422, "tasks", "only the built-in tasks (books-cloze, books-lastword) run on this server"),
    ({"tasks": ["../x"]}, 422, "tasks", "String should match pattern"),
    ({"task_limit": 0}, 422, "task_limit", "greater than or equal to 1"),
    ({"calibration": ["hf:wikitext:wikitext-2-raw-v1"]}, 403, "calibration", "hub datasets are not allowed"),
    ({"calibration": ["hf:wikitext/../../etc"]}, 422, "calibration", "not a dataset id"),
    ({"calibration": ["builtin:poems"]}, 422, "calibration", "unknown built-in text"),
    ({"trust_remote_code": True}, 403, "trust_remote_code", "does not run model code"),
    ({"space": {"subset_size": [9, 2]}}, 422, "space.subset_size", "1 <= min <= max"),
    ({"space": {"repairs": ["refit"]}}, 422, "space.repairs", "Input should be"),
    ({"space": {"ridge": [0, 1]}}, 422, "space.ridge", "greater than 0"),
    ({"space": {"ridge": [1, 0.1]}}, 422, "space.ridge", "min <= max"),
    ({"surprise": 1}, 422, "surprise", "Extra inputs are not permitted"),
    ({"finetune": {"steps": 0}}, 422, "steps", "greater than or equal to 1"),
    ({"finetune": {"steps": 9000}}, 422, "steps", "at most 5000"),
    ({"model": "a\u0000b.gguf"}, 422, "model", "String should match pattern"),
    ({"calibration": ["toy\u0000"]}, 422, "calibration", "String should match pattern"),
    ({"heldout": ["x\u0000y"]}, 422, "heldout", "String should match pattern"),
    ({"trials": True}, 422, "trials", "valid integer"),
    ({"calibration": ["builtin:books:5000"], "pool_size": 8}, 422, "calibration", "at most 256"),
    ({"calibration": ["builtin:books:200", "toy"], "pool_size": 100}, 422, "calibration", "cannot cover"),
    ({"space": {"fixed": {"aggregation": "nonsense"}}}, 422, "space.fixed.aggregation", "must be one of"),
    ({"space": {"fixed": {"nope": 1}}}, 422, "space.fixed.nope", "not a search parameter"),
    ({"space": {"fixed": {"layers_first": 1e9}}}, 422, "space.fixed.layers_first", "not a search parameter"),
    ({"space": {"fixed": {"layer_first": 1.5}}}, 422, "space.fixed.layer_first", "an integer"),
    ({"space": {"fixed": {f"k{i}": 1 for i in range(200)}}}, 422, "space.fixed", "at most 64"),
    ({"baselines": ["magnitude"] * 50}, 422, "baselines", "at most"),
    ({"model": "x" * 300}, 422, "model", "unknown model"),  # a name over 255 bytes: no such folder
    ({"model": "tiny/" + "x" * 300}, 403, "model", "not on this server's allow-list"),  # reads as a hub id
    ({"model": "./tiny/" + "x" * 300}, 422, "model", "cannot be a path in the models folder"),
    ({"calibration": ["x" * 300]}, 422, "calibration", "cannot be a path in the texts folder"),
    ({"evaluation": ["toy/" + "x" * 300]}, 422, "evaluation", "cannot be a path in the texts folder"),
    ({"heldout": ["x" * 300]}, 422, "heldout", "cannot be a path in the texts folder"),
    ({"calibration": ["loop"]}, 422, "calibration", "cannot be a path in the texts folder (a symlink loop)"),
    ({"target": "0.2"}, 422, "target", "valid number"),  # strict types: no strings for numbers or booleans
    ({"min_speedup": 1.0}, 422, "min_speedup", "greater than 1"),
    ({"min_speedup": "1.5"}, 422, "min_speedup", "valid number"),
    ({"min_speedup": 1e9}, 422, "min_speedup", "less than 100"),
    ({"trust_remote_code": 0}, 422, "trust_remote_code", "valid boolean"),
    ({"space": {"depth": "yes"}}, 422, "depth", "valid boolean"),
    ({"measure_cost": 1}, 422, "measure_cost", "valid boolean"),
    ({"space": {"fixed": {"drop_layers": 4}}}, 422, "space.fixed", "would drop every layer of a model of 4"),
    ({"space": {"fixed": {"layer_first": 2, "layer_last": 2}}}, 422, "space.fixed", "leave no layer to prune"),
    ({"target": 10**8}, 422, "target", "cannot remove 100000000 parameters: the model has"),
    ({"target": [0.2, 0.2]}, 422, "target", "lists a target twice"),
    ({"target": [0.2, 0.2000001]}, 422, "target", "name one study, r0.2"),  # no command-line hint over HTTP
    ({"evaluation": ["builtin:books:5"]}, 422, "evaluation", "take no sample count"),
    ({"heldout": ["builtin:news:5"]}, 422, "heldout", "take no sample count"),
    ({"calibration": ["builtin:books:\u00b2"]}, 422, "calibration", "unknown built-in text 'books:\u00b2'"),
    ({"calibration": ["builtin:books:\u2460"]}, 422, "calibration", "unknown built-in text"),
    ({"calibration": ["builtin:books:\u0663"]}, 422, "calibration", "unknown built-in text"),
    ({"calibration": ["builtin:books:\U0001d7d3"]}, 422, "calibration", "unknown built-in text"),
    ({"model": "fake.gguf"}, 422, "model", "is not a GGUF file"),
    ({"model": "empty"}, 422, "model", "has no config.json"),
    ({"model": "."}, 422, "model", "has no config.json"),
])
def test_bad_jobs_get_4xx_naming_the_field(client, change, status, field, message):
    response = submit(client, **change)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert any(field.split(".")[-1] in map(str, d["loc"]) and message in d["msg"] for d in detail), detail


def test_the_far_builtin_text_validates_a_job(client):
    response = submit(client, evaluation=["builtin:books", "builtin:wiki", "builtin:jargon"])
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["evaluation"] == ["builtin:books", "builtin:wiki", "builtin:jargon"]
    refused = submit(client, evaluation=["builtin:jargons"])
    assert refused.status_code == 422 and "choose from books, wiki, news, jargon" in refused.text


def test_a_whole_number_written_with_a_decimal_point_is_that_number(client):
    """JSON has one kind of number; JSON Schema's integer takes 5.0 (schemathesis sends such bodies)."""
    response = submit(client, trials=5.0, seq_len=32.0)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["trials"] == 5 and response.json()["spec"]["seq_len"] == 32
    refused = submit(client, trials=5.5)
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == "trials"


@pytest.mark.parametrize("body", ['{"target": NaN}', '{"trials": Infinity}', '{"trials": 1e400}',
                                  '{"target": -Infinity}', '{"space": {"ridge": [NaN, 1]}}'])
def test_non_finite_numbers_get_422_not_500(client, body):
    response = client.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][1] in ("target", "trials", "space")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream"])
def test_a_body_that_is_not_text_gets_422_not_500(client, content_type):
    headers = AUTH if content_type is None else {**AUTH, "Content-Type": content_type}
    response = client.post("/v1/jobs", content=b"\x80\xff", headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body"]


def test_json_that_is_not_utf8_gets_the_documented_400(client):
    not_utf8 = b'{"name": "\xc3("}'
    response = client.post("/v1/jobs", content=not_utf8, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    documented = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["responses"]
    assert "400" in documented and response.json()["detail"]


def test_a_huge_offset_gets_422(client):
    response = client.get("/v1/jobs", params={"offset": 9223372036854775808})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "offset"]


def test_the_error_answers_are_documented(client):
    responses = client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    assert {"401", "403", "404", "409", "422"} <= set(responses)
    report = client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/report"]["get"]["responses"]
    assert "text/markdown" in report["200"]["content"]


def test_a_job_takes_a_parameter_count_as_its_ratio(client):
    response = submit(client, target=20000)  # of the tiny model's 122,880 prunable parameters
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["target"] == 20000


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_the_job_schema_refuses_a_non_finite_ratio(number):
    with pytest.raises(ValidationError, match="finite number"):
        JobCreate(**small_job(target=number))


def test_unknown_ids_are_404(client):
    for path in ("", "/trials", "/model", "/report"):
        response = client.get(f"/v1/jobs/0123456789abcdef0123456789abcdef{path}")
        assert response.status_code == 404
        assert "no job" in response.json()["detail"]
    assert client.post("/v1/jobs/nope/cancel", headers=AUTH).status_code == 404


def test_cancel_and_no_model_yet(client):
    job_id = submit(client).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}/model").status_code == 409
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 409
    bad_name = client.get(f"/v1/jobs/{job_id}/model", params={"filename": "../x"})
    assert bad_name.status_code == 422
    assert bad_name.json()["detail"][0]["loc"] == ["query", "filename"]


def test_a_gguf_is_409_until_it_exists_and_422_for_a_job_that_does_not_write_one(client):
    plain = submit(client).json()["id"]
    answer = client.get(f"/v1/jobs/{plain}/model", params={"format": "gguf"})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", "format"]
    assert "export_format gguf" in answer.json()["detail"][0]["msg"]
    gguf = submit(client, export_format="gguf").json()["id"]
    assert client.get(f"/v1/jobs/{gguf}/model", params={"format": "gguf"}).status_code == 409


@pytest.mark.parametrize("field, value", [("export_format", "onnx"), ("gguf_type", "q3_xs")])
def test_an_unknown_export_format_or_gguf_type_is_refused_by_name(client, field, value):
    answer = submit(client, **{field: value})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"][-1] == field


OTHER, ADMIN = "other-token-5678", "admin-token-9999"


@pytest.fixture
def tokens(backend, monkeypatch):
    """Clients of three tokens on one server, reads private: the owner, another user, an admin."""
    env = {**backend, "ADAPRUNER_API_TOKENS": f"{TOKEN},{OTHER}", "ADAPRUNER_ADMIN_TOKENS": ADMIN,
           "ADAPRUNER_PUBLIC_READS": "false"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with TestClient(create_app(Settings())) as c:
        yield c


def test_only_the_owner_or_an_admin_sees_and_cancels_a_job(tokens):
    other, admin = {"Authorization": f"Bearer {OTHER}"}, {"Authorization": f"Bearer {ADMIN}"}
    mine = submit(tokens).json()["id"]
    theirs = tokens.post("/v1/jobs", json=small_job(), headers=other).json()["id"]

    def listed(headers):  # the database may hold other tests' jobs (of the first token)
        return {j["id"] for j in tokens.get("/v1/jobs", params={"limit": 100}, headers=headers).json()["items"]}

    assert mine in listed(AUTH)
    assert theirs not in listed(AUTH)
    assert listed(other) == {theirs}
    assert {mine, theirs} <= listed(admin)
    for path in ("", "/trials", "/model", "/report"):
        assert tokens.get(f"/v1/jobs/{mine}{path}", headers=other).status_code == 404
    assert tokens.post(f"/v1/jobs/{mine}/cancel", headers=other).status_code == 404
    assert tokens.get(f"/v1/jobs/{mine}", headers=AUTH).json()["status"] == "queued"
    assert tokens.post(f"/v1/jobs/{theirs}/cancel", headers=admin).json()["status"] == "cancelled"
    assert tokens.post(f"/v1/jobs/{mine}/cancel", headers=AUTH).json()["status"] == "cancelled"


def test_with_public_reads_another_token_still_cannot_cancel(backend, monkeypatch):
    for key, value in {**backend, "ADAPRUNER_API_TOKENS": f"{TOKEN},{OTHER}"}.items():
        monkeypatch.setenv(key, value)
    with TestClient(create_app(Settings())) as c:
        job_id = submit(c).json()["id"]
        response = c.post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {OTHER}"})
        assert response.status_code == 403
        assert "another token" in response.json()["detail"]
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_restarting_the_api_loses_nothing(backend, monkeypatch):
    for key, value in backend.items():
        monkeypatch.setenv(key, value)
    with TestClient(create_app(Settings())) as first:
        job_id = submit(first).json()["id"]
    time.sleep(0.1)
    with TestClient(create_app(Settings())) as second:
        job = second.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued"
        assert len(second.get(f"/v1/jobs/{job_id}/trials").json()["items"]) == 2


def test_a_job_row_that_cannot_be_stored_leaves_no_study_behind(backend, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from service import jobs
    from service.db import make_engine, session_factory
    from service.policy import check_spec

    for key, value in backend.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    engine = make_engine(settings.db_url)
    with TestClient(create_app(settings)) as client:  # the app's pools close with it
        storage = client.app.state.storage
        before = {s.study_name for s in optuna.get_all_study_summaries(storage)}
        with session_factory(engine)() as db:
            def locked():
                raise OperationalError("INSERT INTO jobs", {}, Exception("database is locked"))

            monkeypatch.setattr(db, "commit", locked)
            with pytest.raises(OperationalError):
                jobs.create_job(db, storage, check_spec(JobCreate(**small_job()), settings), "owner")
        assert {s.study_name for s in optuna.get_all_study_summaries(storage)} == before
    engine.dispose()


def test_concurrent_cancels_submissions_and_claims_never_fail(client):
    """Each job cancelled by two requests at once: one 200, one 409, never a 500 (SQLite refused a read
    transaction's upgrade to a write when another write had landed in between), beside new submissions and
    workers claiming jobs."""
    from concurrent.futures import ThreadPoolExecutor

    from service import jobs
    from service.worker import Worker

    ids = [submit(client).json()["id"] for _ in range(8)]
    worker = Worker(Settings())

    def cancel(job_id):
        return client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code

    def claim():
        with worker.sessions() as db:
            return jobs.claim_job(db, worker.storage, worker.settings) is not None

    with ThreadPoolExecutor(8) as pool:
        cancels = [pool.submit(cancel, job_id) for job_id in ids * 2]
        submissions = [pool.submit(lambda: submit(client).status_code) for _ in range(4)]
        claims = [pool.submit(claim) for _ in range(2)]
        codes = [f.result() for f in cancels]
        assert [f.result() for f in submissions] == [202] * 4
        assert all(f.result() in (True, False) for f in claims)  # no error, whatever was left to claim
    assert sorted(codes) == [200] * 8 + [409] * 8
    assert all(client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled" for job_id in ids)


def test_a_method_not_allowed_names_every_method_the_path_takes(client):
    response = client.delete("/v1/jobs")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"  # GET lists the jobs, POST submits one
    assert response.json() == {"detail": "Method Not Allowed"}
    assert client.put("/v1/jobs/abc/cancel").headers["allow"] == "POST"


def test_a_worker_runs_the_job_stored_with_its_study(client, backend):
    from adapruner.search import make_storage
    from service import jobs
    from service.worker import Worker

    job_id = submit(client).json()["id"]
    worker = Worker(Settings())
    with worker.sessions() as db:
        job = jobs.get_job(db, job_id)
    stored = jobs.stored_job(worker.storage, job)
    assert stored.to_dict() == JobCreate.model_validate(job.spec).to_search_job().to_dict()
    study = optuna.load_study(study_name=jobs.job_targets(job)[0][1], storage=make_storage(backend[
        "ADAPRUNER_DATABASE_URL"]))
    study.set_user_attr("job", {**study.user_attrs["job"], "seed": 7})  # what the study holds is what runs
    assert jobs.stored_job(worker.storage, job).seed == 7
