"""A client generated from openapi.yaml by openapi-python-client is complete and works.

The generator drops, with only a warning, every response and schema it cannot translate, so a
generated app would silently lose e.g. the analysis a 502 `user_service_error` carries. The
client is generated with warnings as errors, imported, and used against the real
`gunicorn app:app` on loopback, with every undocumented status raising.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import jwt
import pytest

from tests import images
from tests.conftest import JWT_SECRET, running_gunicorn
from tests.fakes import (
    DEFAULT_ANALYSIS,
    ChatCompletionsServer,
    RedisServer,
    Reply,
    UserServiceServer,
    json_error,
)
from tests.servers import Gunicorn

OPENAPI_YAML = Path(__file__).resolve().parent.parent / "openapi.yaml"
PACKAGE = "image_service_client"
GENERATOR = Path(sys.executable).parent / "openapi-python-client"
MAX_UPLOAD_MB = 0.05  # small enough for a 413 from a small upload
MODEL_TIMEOUT_SECONDS = 2  # one attempt; a reply delayed longer answers 504


@pytest.fixture(scope="module")
def client_package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The generated package, imported from a temporary folder; a warning fails the module."""
    assert GENERATOR.is_file(), (
        f"{GENERATOR} is missing: install requirements-dev.txt (make test does)"
    )
    folder = tmp_path_factory.mktemp("generated-client")
    generated = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--path",
            str(OPENAPI_YAML),
            "--meta",
            "none",
            "--output-path",
            str(folder / PACKAGE),
            "--fail-on-warning",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        # ruff, which formats the generated code, lives beside the generator
        env={**os.environ, "PATH": f"{GENERATOR.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        check=False,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert "warning" not in (generated.stdout + generated.stderr).lower(), generated.stdout
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def served(
    redis_server: RedisServer,
    model_server: ChatCompletionsServer,
    user_service_server: UserServiceServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gunicorn]:
    """One gunicorn for the module; each test resets the collaborators it uses."""
    if not redis_server.running:
        redis_server.start()
    with running_gunicorn(
        redis_server,
        model_server,
        user_service_server,
        tmp_path_factory.mktemp("gunicorn-generated-client"),
        MAX_UPLOAD_MB=str(MAX_UPLOAD_MB),
        OPENAI_API_TIMEOUT=str(MODEL_TIMEOUT_SECONDS),
        OPENAI_MAX_ATTEMPTS="1",
    ) as server:
        yield server


@pytest.fixture
def api(
    client_package: ModuleType,
    served: Gunicorn,
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> Iterator[Any]:
    """A generated AuthenticatedClient for the running service; undocumented statuses raise."""
    now = int(time.time())
    token = jwt.encode(
        {"sub": "user-42", "type": "access", "iat": now, "exp": now + 600},
        JWT_SECRET,
        algorithm="HS256",
    )
    with client_package.AuthenticatedClient(
        base_url=served.url, token=token, raise_on_unexpected_status=True, timeout=30.0
    ) as client:
        yield client


def analyze_with_client(
    client: Any, photo: bytes | None = None, *more: bytes, **params: str
) -> Any:
    """POST a photo (a small JPEG by default), and any more of the same meal, through the
    generated analyze_food operation."""
    models = importlib.import_module(f"{PACKAGE}.models")
    types = importlib.import_module(f"{PACKAGE}.types")
    analyze_food = importlib.import_module(f"{PACKAGE}.api.analysis.analyze_food")
    photos = [photo if photo is not None else images.jpeg(64, 48), *more]
    files = [
        types.File(payload=io.BytesIO(data), file_name=f"meal-{number}.jpg", mime_type="image/jpeg")
        for number, data in enumerate(photos, start=1)
    ]
    return analyze_food.sync_detailed(
        client=client, body=models.AnalyzeFoodBody(image=files), **params
    )


def generated(name: str) -> Any:
    """A class of the generated models."""
    return getattr(importlib.import_module(f"{PACKAGE}.models"), name)


def test_the_generated_client_reads_health(api: Any) -> None:
    health = importlib.import_module(f"{PACKAGE}.api.operations.health")

    response = health.sync_detailed(client=api)

    assert response.status_code == 200
    assert isinstance(response.parsed, generated("Health"))
    assert response.parsed.status.value == "healthy"
    assert response.parsed.checks.redis == "connected"


def test_the_generated_client_saves_an_analysis(api: Any, user_service: UserServiceServer) -> None:
    response = analyze_with_client(api, save="true", idempotency_key="meal-1")

    assert response.status_code == 200
    assert isinstance(response.parsed, generated("AnalyzeResponse"))
    assert response.parsed.analysis.name == DEFAULT_ANALYSIS["name"]
    assert response.parsed.analysis.entry_id == user_service.entries[0]["id"]


def test_the_generated_client_sends_two_photos_of_one_meal(
    api: Any, model: ChatCompletionsServer
) -> None:
    other = images.jpeg(64, 48, color=(20, 160, 40))

    response = analyze_with_client(api, images.jpeg(64, 48), other)

    assert response.status_code == 200
    assert response.parsed.analysis.photo_count == 2
    [call] = model.calls
    parts = call.json()["messages"][1]["content"]
    assert [part["type"] for part in parts].count("image_url") == 2


def test_a_failed_save_keeps_the_analysis_in_the_generated_model(
    api: Any, user_service: UserServiceServer
) -> None:
    user_service.enqueue(json_error(500, "database down"))

    response = analyze_with_client(api, save="true")

    assert response.status_code == 502
    assert isinstance(response.parsed, generated("UserServiceError"))
    assert response.parsed.code.value == "user_service_error"
    assert response.parsed.analysis.name == DEFAULT_ANALYSIS["name"]
    assert response.parsed.analysis.calories == DEFAULT_ANALYSIS["calories"]


def test_a_model_failure_is_a_502_of_its_own_in_the_generated_client(
    api: Any, model: ChatCompletionsServer
) -> None:
    model.enqueue(ChatCompletionsServer.completion(None, refusal="I cannot help with that."))

    response = analyze_with_client(api)

    assert response.status_code == 502
    assert not isinstance(response.parsed, generated("UserServiceError"))
    assert response.parsed.code.value == "upstream_error"


def test_the_generated_client_reads_a_too_large_upload(api: Any) -> None:
    response = analyze_with_client(api, images.jpeg(640, 480, pattern="photo"))

    assert response.status_code == 413
    assert response.parsed.code.value == "payload_too_large"


def test_the_generated_client_reads_a_model_timeout(api: Any, model: ChatCompletionsServer) -> None:
    model.enqueue(Reply(delay=MODEL_TIMEOUT_SECONDS + 1.0))

    response = analyze_with_client(api)

    assert response.status_code == 504
    assert response.parsed.code.value == "upstream_timeout"


def test_the_generated_client_reads_an_idempotency_key_in_use(
    api: Any, model: ChatCompletionsServer
) -> None:
    slow = replace(model.completion(json.dumps(DEFAULT_ANALYSIS)), delay=1.0)
    model.enqueue(slow)
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(analyze_with_client, api, None, save="true", idempotency_key="meal-2")
        model.wait_for_requests(1)

        response = analyze_with_client(api, save="true", idempotency_key="meal-2")

        assert first.result().status_code == 200
    assert response.status_code == 409
    assert response.parsed.code.value == "idempotency_key_in_progress"
