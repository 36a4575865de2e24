"""The HTTP API (FastAPI): submit search jobs, follow them, fetch the best pruned model.

Routes are thin: they check access, call :mod:`service.jobs` (the life cycle) and :mod:`service.views` (what
is shown), and shape the answer. Writes need
``Authorization: Bearer <token>``; reads too unless ``ADAPRUNER_PUBLIC_READS`` is on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Annotated, Literal

import optuna
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from sqlalchemy import text
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from adapruner import __version__
from adapruner.errors import AdaPrunerError
from adapruner.search import StudyKey, artifact_store, close_storage, make_storage

from . import jobs, views
from .db import JobStatus, check_schema, make_engine, session_factory
from .policy import InvalidField, PolicyError, check_spec
from .schemas import MODEL_FORMATS, SAFE_NAME, ErrorOut, JobCreate, JobList, JobOut, TrialList
from .settings import Settings

bearer = HTTPBearer(auto_error=False)


# -- dependencies -------------------------------------------------------------------------------


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_storage(request: Request) -> optuna.storages.BaseStorage:
    return request.app.state.storage


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def require_writer(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                   settings: Annotated[Settings, Depends(get_settings)]) -> jobs.Caller:
    if credentials is None:
        raise _unauthorized("this request needs an Authorization: Bearer <token> header")
    owner = settings.token_id(credentials.credentials)
    if owner is None:
        raise _unauthorized("invalid API token")
    return jobs.Caller(owner, admin=settings.is_admin(credentials.credentials))


def require_reader(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                   settings: Annotated[Settings, Depends(get_settings)]) -> jobs.Caller | None:
    """``None`` when reads are public (everyone sees every job); else the caller, who sees its own."""
    if settings.public_reads:
        return None
    return require_writer(credentials, settings)


DB = Annotated[Session, Depends(get_db)]
Storage = Annotated[optuna.storages.BaseStorage, Depends(get_storage)]
Config = Annotated[Settings, Depends(get_settings)]
Writer = Annotated[jobs.Caller, Depends(require_writer)]
Reader = Annotated[jobs.Caller | None, Depends(require_reader)]
ERRORS = {code: {"model": ErrorOut, "description": text} for code, text in (
    (401, "no token, or an invalid one"), (403, "not allowed: a path outside the roots, another token's job"),
    (404, "no such job (or not yours)"), (409, "the job is not in a state that allows this"))}


# -- routes -------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", tags=["jobs"], responses=ERRORS)


NOT_UTF8 = {400: {"model": ErrorOut, "description": "a JSON body that is not UTF-8 (FastAPI's body parser)"}}


@router.post("/jobs", status_code=202, response_model=JobOut, responses=NOT_UTF8)
def submit_job(spec: JobCreate, response: Response, caller: Writer, db: DB, storage: Storage,
               settings: Config) -> JobOut:
    """Queue a search job. Answers 202 with the job and a Location header to follow it."""
    job = jobs.create_job(db, storage, check_spec(spec, settings), caller.owner)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return views.job_view(job, storage, settings)


@router.get("/jobs", response_model=JobList)
def list_jobs(reader: Reader, db: DB, settings: Config,
              status: JobStatus | None = None, offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    items, total = jobs.list_jobs(db, status, offset, limit, reader)
    digests = views.study_digests(db, [name for j in items for _, name in jobs.job_targets(j)])
    shown = [views.job_summary(j, settings, views.job_digest(j, digests)) for j in items]
    return JobList(items=shown, total=total, offset=offset, limit=limit)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, reader: Reader, db: DB, storage: Storage, settings: Config) -> JobOut:
    """Status, progress (n/N, ETA), best configuration so far, baselines, and links."""
    return views.job_view(jobs.get_job(db, job_id, reader), storage, settings)


@router.get("/jobs/{job_id}/trials", response_model=TrialList)
def get_trials(job_id: str, reader: Reader, db: DB, storage: Storage) -> TrialList:
    studies = jobs.load_studies(storage, jobs.get_job(db, job_id, reader))
    return TrialList(items=[views.trial_summary(t, target) for target, study in studies
                            for t in study.get_trials(deepcopy=False)])


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, caller: Writer, reader: Reader, db: DB, storage: Storage,
               settings: Config) -> JobOut:
    """Stop the job: no trial is handed out any more, and its workers leave it within seconds."""
    return views.job_view(jobs.cancel_job(db, job_id, caller, reader), storage, settings)


@router.get("/jobs/{job_id}/model", responses={200: {"description": "the model file", "content": {
    "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
def download_model(job_id: str, reader: Reader, db: DB, storage: Storage, settings: Config,
                   filename: Annotated[str | None, Query(pattern=SAFE_NAME)] = None,
                   target: Annotated[float | None, Query(gt=0, description="which target's model, for a job of "
                                                         "several (as submitted)")] = None,
                   file_format: Annotated[Literal[MODEL_FORMATS], Query(alias="format", description=(  # type: ignore[valid-type]
                       "tar: the transformers folder as a tar archive; gguf: one GGUF file for llama.cpp (a job "
                       "submitted with export_format gguf)"))] = "tar",
                   ) -> StreamingResponse:
    """The best pruned model (of ``target``): a tar archive (``model/`` with safetensors, config and tokenizer),
    or with ``format=gguf`` the GGUF file llama.cpp runs (409 until it exists, 422 for a job without it)."""
    job = jobs.get_job(db, job_id, reader)
    artifact_id = jobs.target_artifact(job, storage, target, file_format)
    reader = artifact_store(settings.artifacts).open_reader(artifact_id)
    name = filename or f"{job.name or job.id}-model" + (f"-r{target:g}" if target is not None else "")
    media = "application/octet-stream" if file_format == "gguf" else "application/x-tar"
    return StreamingResponse(iter(lambda: reader.read(1 << 20), b""), media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="{name}.{file_format}"'})


@router.get("/jobs/{job_id}/report", responses={200: {"description": "the report (markdown)", "content": {
    "text/markdown": {"schema": {"type": "string"}}}}})
def get_report(job_id: str, reader: Reader, db: DB, storage: Storage) -> PlainTextResponse:
    """The study's markdown report: baselines beside the best configuration, cost, importances."""
    from adapruner.search import report_markdown, tradeoff_markdown

    job = jobs.get_job(db, job_id, reader)
    studies = [s for _, s in jobs.load_studies(storage, job) if StudyKey.JOB in s.user_attrs]
    if not studies:
        raise jobs.NotFound(f"job {job_id} has no study")
    if len(studies) == 1:
        return PlainTextResponse(report_markdown(studies[0]), media_type="text/markdown")
    parts = [tradeoff_markdown(studies), *(report_markdown(s) for s in studies)]
    return PlainTextResponse("\n\n".join(parts), media_type="text/markdown")


def reads_without_token(spec: dict) -> dict:
    """The OpenAPI document of a service whose reads are public: its GET operations take a token but need none
    (an empty security requirement beside the bearer one)."""
    for path in spec.get("paths", {}).values():
        operation = path.get("get")
        if operation and operation.get("security") and {} not in operation["security"]:
            operation["security"] = [{}, *operation["security"]]
    return spec


def health(request: Request) -> dict:
    with request.app.state.sessions() as session:
        session.execute(text("SELECT 1"))
    return {"status": "ok", "version": __version__}


# -- the app --------------------------------------------------------------------------------------


def finite(value):
    """``value`` with every non-finite float replaced by its name, so that it encodes as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _field_error(status: int, field: str, message: str, kind: str) -> JSONResponse:
    loc = ["body", *field.split(".")]
    return JSONResponse({"detail": [{"loc": loc, "msg": message, "type": kind}]}, status_code=status)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = make_engine(settings.db_url)
    check_schema(engine)
    # FastAPIOffline: /docs and /redoc serve their scripts and styles from the package, not a CDN, so they
    # work on an air-gapped host.
    storage = make_storage(settings.db_url, create_tables=False)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.dispose()  # the pools close with the app, not when the process ends
        close_storage(storage)

    app = FastAPIOffline(title="AdaPruner", version=__version__, lifespan=lifespan,
                         description="Bayesian-optimization search for structured-pruning configurations.")
    app.state.settings = settings
    if settings.public_reads:
        document = app.openapi
        app.openapi = lambda: reads_without_token(document())
    app.state.sessions = session_factory(engine)
    app.state.storage = storage
    app.include_router(router)
    app.add_api_route("/healthz", health, methods=["GET"], tags=["health"])

    @app.exception_handler(PolicyError)
    def _forbidden(_request, exc: PolicyError):
        return _field_error(403, exc.field, str(exc), "forbidden")

    @app.exception_handler(InvalidField)
    def _invalid(_request, exc: InvalidField):
        return _field_error(422, exc.field, str(exc), "value_error")

    @app.exception_handler(AdaPrunerError)
    def _bad_job(_request, exc: AdaPrunerError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(jobs.NotFound)
    def _not_found(_request, exc: jobs.NotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(jobs.Forbidden)
    def _not_yours(_request, exc: jobs.Forbidden):
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(RequestValidationError)
    def _unprocessable(_request, exc: RequestValidationError):
        # As FastAPI's own handler, except that the echoed input may hold NaN or Infinity (JSON has
        # neither): those are sent as strings rather than failing the answer with a 500.
        # A body that is not text (no content type, invalid UTF-8) is echoed as bytes: sent decoded, replacing
        # what is not UTF-8, rather than failing the answer.
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")})
        return JSONResponse({"detail": finite(errors)}, status_code=422)

    @app.exception_handler(jobs.InvalidTarget)
    def _no_such_target(_request, exc: jobs.InvalidTarget):
        return JSONResponse({"detail": [{"loc": ["query", "target"], "msg": str(exc), "type": "value_error"}]},
                            status_code=422)

    @app.exception_handler(jobs.InvalidFormat)
    def _no_such_format(_request, exc: jobs.InvalidFormat):
        return JSONResponse({"detail": [{"loc": ["query", "format"], "msg": str(exc), "type": "value_error"}]},
                            status_code=422)

    @app.exception_handler(jobs.Conflict)
    def _conflict(_request, exc: jobs.Conflict):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:  # Starlette names the first route's methods only; a path may have several
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return await http_exception_handler(request, exc)

    return app


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at the request's path (the router's own matching, method by method)."""
    return [method for method in METHODS if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                                                for route in request.app.router.routes)]
