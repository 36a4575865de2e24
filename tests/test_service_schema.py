"""Schemathesis over the API's own OpenAPI document: generated requests, valid and not, to every route.

No answer may be a server error, and every status code must be one the document lists. Bounded: a
few dozen examples per operation, against a fresh SQLite database (no worker runs).
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from helpers import TOKEN, service_env
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from service.app import create_app
from service.db import upgrade
from service.settings import Settings


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, roots):
    folder = tmp_path_factory.mktemp("schema")
    url = f"sqlite:///{folder / 'service.db'}"
    upgrade(url)
    app = create_app(Settings(**{k.removeprefix("ADAPRUNER_").lower(): v
                                 for k, v in service_env(folder / "data", url, roots).items()}))
    with TestClient(app):  # runs the app's lifespan, so its database pools close after the test
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_server_error_and_no_undocumented_status(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def generated(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"},
                                   checks=[not_a_server_error, status_code_conformance])

        generated()
