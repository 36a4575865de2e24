"""Schemathesis over the API's own OpenAPI document: generated requests, valid and not, to every route, with
every check that applies to this API: no server error; status codes, content types, headers and bodies as the
document says; schema-invalid requests rejected; reads and writes as their security says. One check does not
apply: ``positive_data_acceptance`` (a schema-valid request is accepted), since a valid-looking job may name a
model the server does not have or exceed the server's limits, which is a 422 naming the field by design.
Bounded: a few dozen examples per operation, against a fresh database on SQLite and on PostgreSQL (no worker
runs), with a roots fixture that holds a symlink loop."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from helpers import TOKEN, drop_postgres, postgres_url_or_skip, service_env
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.db import upgrade
from service.settings import Settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, missing_required_header, ignored_auth]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api_schema(request, tmp_path_factory, roots):
    """The API on a database of its own (the jobs schemathesis submits stay queued: no other test's workers may
    find them), dropped afterwards."""
    folder = tmp_path_factory.mktemp("schema")
    url = f"sqlite:///{folder / 'service.db'}" if request.param == "sqlite" else postgres_url_or_skip()
    request.addfinalizer(lambda: None if url.startswith("sqlite") else drop_postgres(url))
    upgrade(url)
    app = create_app(Settings(**{k.removeprefix("ADAPRUNER_").lower(): v
                                 for k, v in service_env(folder / "data", url, roots).items()}))
    with TestClient(app):  # runs the app's lifespan, so its database pools close after the test
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_applicable_check_passes_on_every_route(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def generated(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"},
                                   checks=CHECKS)

        generated()
