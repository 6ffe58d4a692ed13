"""openapi.yaml describes the service exactly: it is served as /openapi.json and the app keeps it.

Every generated request goes to an app built from the test Config, in process (WSGI), with a
valid bearer token (schemathesis' negative cases also drop it on purpose). No answer may be a 5xx,
and every answer must conform to the document: documented status code, content type, headers and
body. Random bytes are rarely images, so most generated uploads answer 400; schemathesis also
sends its tiny sample JPEG/PNG/GIF/WebP files, and the explicit cases below send real photos
through every documented outcome.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
import yaml
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app import Config, create_app
from tests import images
from tests.fakes import (
    DEFAULT_ANALYSIS,
    ChatCompletionsServer,
    Reply,
    UserServiceServer,
    free_port,
    json_error,
)
from tests.open_food_facts import OpenFoodFactsServer

OPENAPI_YAML = Path(__file__).resolve().parent.parent / "openapi.yaml"
# The answer is what the document says: status code, content type, headers and body.
DOCUMENT_CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Werkzeug spells a path parameter <converter:name>, OpenAPI {name}.
RULE_PARAMETER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def document() -> dict[str, Any]:
    """openapi.yaml, parsed."""
    loaded: dict[str, Any] = yaml.safe_load(OPENAPI_YAML.read_text(encoding="utf-8"))
    return loaded


def schema_objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every Schema Object in the document: values of `schema` and of `components.schemas`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema" and isinstance(value, dict):
                yield value
            elif key == "schemas" and isinstance(value, dict):
                yield from (item for item in value.values() if isinstance(item, dict))
            yield from schema_objects(value)
    elif isinstance(node, list):
        for item in node:
            yield from schema_objects(item)


def documented_operations() -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in the document."""
    return {
        (method.upper(), path)
        for path, item in document()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def routed_operations(app: Flask) -> set[tuple[str, str]]:
    """(METHOD, path) of every route of the app, without the HEAD and OPTIONS Flask adds."""
    return {
        (method, RULE_PARAMETER.sub(r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in {"HEAD", "OPTIONS"}
    }


@pytest.fixture
def app(
    make_config: Callable[..., Config], sr28_dir: Path, open_food_facts: OpenFoodFactsServer
) -> Flask:
    """The app the document is checked against, with the USDA SR28 table loaded and products
    looked up in a loopback Open Food Facts."""
    flask_app = create_app(
        make_config(nutrition_source="usda-sr28", openfoodfacts_url=open_food_facts.url)
    )
    flask_app.testing = True
    return flask_app


# ----------------------------------------------------------------------------- the document


def test_openapi_json_serves_openapi_yaml(client: FlaskClient) -> None:
    response = client.get("/openapi.json")

    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["X-Request-ID"]
    assert response.get_json() == document()


def test_openapi_json_needs_no_token(client: FlaskClient) -> None:
    response = client.get("/openapi.json", headers={"Authorization": "Bearer not-a-token"})

    assert response.status_code == 200


def test_document_is_valid_openapi_3_1() -> None:
    spec = document()
    assert spec["openapi"].startswith("3.1.")

    schemathesis.openapi.from_dict(spec).validate()  # the OpenAPI 3.1 meta-schema
    for schema in schema_objects(spec):  # which leaves Schema Objects to JSON Schema 2020-12
        jsonschema_rs.meta.validate(schema)


def test_every_route_is_documented_and_every_documented_path_is_routed(app: Flask) -> None:
    assert routed_operations(app) == documented_operations()


# ----------------------------------------------------------------------------- fuzzing the app

# Loaded from the file at import, as `parametrize()` needs; the first test above proves the app
# serves exactly this document. (`schemathesis.pytest.from_fixture`, which could load it from the
# app, fails under pytest 9.2 in schemathesis 4.32.5: it sets `Function._nodeid`, now gone.)
openapi_schema = schemathesis.openapi.from_path(OPENAPI_YAML)


@openapi_schema.parametrize()
@settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_every_operation_keeps_the_contract(
    case: schemathesis.Case, app: Flask, auth_headers: dict[str, str]
) -> None:
    case.call_and_validate(
        app=app, headers=auth_headers, checks=[not_a_server_error, *DOCUMENT_CHECKS]
    )


# ----------------------------------------------------------------------------- every outcome


def analyze_validated(
    app: Flask,
    headers: dict[str, str],
    *,
    photo: bytes | None = None,
    query: dict[str, str] | None = None,
) -> schemathesis.Response:
    """POST a photo (a small JPEG by default); the answer must match the document the app serves."""
    operation = schemathesis.openapi.from_wsgi("/openapi.json", app)["/analyze-food"]["POST"]
    case = operation.Case(
        query=query or {},
        body={"image": [photo if photo is not None else images.jpeg(64, 48)]},
        media_type="multipart/form-data",
    )
    return case.call_and_validate(app=app, headers=headers, checks=DOCUMENT_CHECKS)


def test_a_saved_analysis_of_a_real_photo_matches_the_document(
    app: Flask, auth_headers: dict[str, str]
) -> None:
    headers = {**auth_headers, "Idempotency-Key": "meal-photo-1"}

    first = analyze_validated(app, headers, query={"save": "true"})
    retry = analyze_validated(app, headers, query={"save": "true"})

    assert first.status_code == 200
    assert first.json()["analysis"]["entryId"]
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == ["true"]


def test_a_cached_analysis_matches_the_document(app: Flask, auth_headers: dict[str, str]) -> None:
    analyze_validated(app, auth_headers, photo=images.png(64, 48))

    response = analyze_validated(app, auth_headers, photo=images.png(64, 48))

    assert response.json()["source"] == "cache"


def not_food(model: ChatCompletionsServer, user_service: UserServiceServer) -> None:
    model.analysis = {**DEFAULT_ANALYSIS, "isFood": False, "name": "", "calories": 0}


def model_refuses(model: ChatCompletionsServer, user_service: UserServiceServer) -> None:
    model.enqueue(ChatCompletionsServer.completion(None, refusal="I cannot help with that."))


def user_service_fails(model: ChatCompletionsServer, user_service: UserServiceServer) -> None:
    user_service.enqueue(json_error(500, "database down"))


FAILURES = {
    "not_food": (not_food, 422),
    "upstream_error": (model_refuses, 502),
    "user_service_error": (user_service_fails, 502),
}


@pytest.mark.parametrize(("arrange", "status"), FAILURES.values(), ids=FAILURES.keys())
def test_a_failed_analysis_matches_the_document(
    app: Flask,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    arrange: Callable[[ChatCompletionsServer, UserServiceServer], None],
    status: int,
) -> None:
    arrange(model, user_service)

    response = analyze_validated(app, auth_headers, query={"save": "yes"})

    assert response.status_code == status


def test_an_idempotency_key_reused_for_another_photo_matches_the_document(
    app: Flask, auth_headers: dict[str, str]
) -> None:
    headers = {**auth_headers, "Idempotency-Key": "meal-photo-2"}
    analyze_validated(app, headers, query={"save": "true"})

    response = analyze_validated(app, headers, photo=images.png(64, 48), query={"save": "true"})

    assert response.status_code == 422
    assert response.json()["code"] == "idempotency_key_reused"


def test_an_invalid_token_matches_the_document(app: Flask) -> None:
    response = analyze_validated(app, {"Authorization": "Bearer not-a-token"})

    assert response.status_code == 401


def test_a_photo_over_the_limit_matches_the_document(
    make_config: Callable[..., Config], auth_headers: dict[str, str]
) -> None:
    app = create_app(make_config(max_upload_mb=0.01))

    response = analyze_validated(app, auth_headers, photo=images.jpeg(640, 480, pattern="photo"))

    assert response.status_code == 413


def test_an_unconfigured_model_matches_the_document(
    make_config: Callable[..., Config], auth_headers: dict[str, str]
) -> None:
    app = create_app(make_config(openai_api_key=None))

    response = analyze_validated(app, auth_headers)

    assert response.status_code == 503


def test_a_model_timeout_matches_the_document(
    make_config: Callable[..., Config], model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(Reply(delay=1.0))
    app = create_app(make_config(openai_api_timeout=0.2, openai_max_attempts=1))

    response = analyze_validated(app, auth_headers)

    assert response.status_code == 504


def test_an_overloaded_service_matches_the_document(
    make_config: Callable[..., Config], model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(replace(model.completion(json.dumps(DEFAULT_ANALYSIS)), delay=1.0))
    app = create_app(make_config(model_max_concurrency=1, model_queue_timeout=0.05))
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(analyze_validated, app, auth_headers)  # holds the only model slot
        model.wait_for_requests(1)

        response = analyze_validated(app, auth_headers, photo=images.png(64, 48))

        assert slow.result().status_code == 200
    assert response.status_code == 503
    assert response.json()["code"] == "overloaded"
    assert response.headers["retry-after"] == ["1"]


def test_an_unhealthy_service_matches_the_document(make_config: Callable[..., Config]) -> None:
    app = create_app(make_config(redis_port=free_port()))
    operation = schemathesis.openapi.from_wsgi("/openapi.json", app)["/health"]["GET"]

    response = operation.Case().call_and_validate(app=app, checks=DOCUMENT_CHECKS)

    assert response.status_code == 503
    assert response.json()["checks"]["redis"] == "connection failed"


def test_a_nutrition_body_that_is_not_json_matches_the_document(
    app: Flask, auth_headers: dict[str, str]
) -> None:
    operation = schemathesis.openapi.from_wsgi("/openapi.json", app)["/nutrition"]["POST"]
    case = operation.Case(body="salmon, 150 g", media_type="text/plain")

    response = case.call_and_validate(app=app, headers=auth_headers, checks=DOCUMENT_CHECKS)

    assert response.status_code == 415
