"""The service against llama.cpp's real server, over HTTP end to end.

A real `gunicorn app:app` sends photos to llama.cpp's server (a small Gemma 3 model with a random
vision projector) through a recording proxy. The projector sees noise, so no test checks what food
is named: they check the exchange, what the server receives and what the caller gets back.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from prompt import ANALYSIS_SCHEMA
from tests import images
from tests.conftest import bearer, running_gunicorn
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer
from tests.servers import Gunicorn
from tests.servers_llama.conftest import MODEL_ALIAS, RecordingProxy
from tests.servers_llama.llama_server import LlamaServer

OUTPUT_TOKENS = "100"  # the service's lowest cap: a few seconds of the model's answer
PHOTO_TIMEOUT = 150.0  # seconds one photo may take through the service on two cores
PROBE_TIMEOUT = 10.0  # seconds until the probe has asked the server
MEAL = images.jpeg(64, 48)
ANOTHER_MEAL = images.jpeg(48, 64)


def service_settings(proxy: RecordingProxy) -> dict[str, str | None]:
    """The service's settings for a llama.cpp server behind ``proxy``."""
    return {
        "OPENAI_BASE_URL": proxy.base_url,
        "OPENAI_API_KEY": "unused",
        "OPENAI_MODEL": MODEL_ALIAS,
        "OPENAI_API_TIMEOUT": "120",
        "OPENAI_MAX_OUTPUT_TOKENS": OUTPUT_TOKENS,
    }


@pytest.fixture
def started_redis(redis_server: RedisServer) -> RedisServer:
    """The tests' Redis, running and empty: where the service keeps what it learnt."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flush()
    return redis_server


@pytest.fixture
def vision_service(
    started_redis: RedisServer,
    model_server: ChatCompletionsServer,
    user_service_server: UserServiceServer,
    vision_proxy: RecordingProxy,
    tmp_path: Path,
) -> Iterator[Gunicorn]:
    """The service pointed at llama.cpp's server with the projector."""
    vision_proxy.reset()
    settings = service_settings(vision_proxy)
    with running_gunicorn(
        started_redis, model_server, user_service_server, tmp_path, **settings
    ) as server:
        yield server


@pytest.fixture
def text_service(
    started_redis: RedisServer,
    model_server: ChatCompletionsServer,
    user_service_server: UserServiceServer,
    text_proxy: RecordingProxy,
    tmp_path: Path,
) -> Iterator[Gunicorn]:
    """The service pointed at llama.cpp's server without a projector."""
    text_proxy.reset()
    settings = service_settings(text_proxy)
    with running_gunicorn(
        started_redis, model_server, user_service_server, tmp_path, **settings
    ) as server:
        yield server


def analyze(server: Gunicorn, photo: bytes) -> requests.Response:
    """POST one photo to the service and wait for the model's answer."""
    return server.session.post(
        f"{server.url}/analyze-food",
        files={"image": ("meal.jpg", photo, "image/jpeg")},
        headers=bearer(),
        timeout=PHOTO_TIMEOUT,
    )


def assert_answered_or_capped(response: requests.Response) -> None:
    """200 with an analysis, or the 502 that names the output-token cap: nothing else."""
    if response.status_code == 200:
        assert response.json()["source"] == "api"
        assert response.json()["analysis"]["model"] == MODEL_ALIAS
        return
    assert response.status_code == 502, response.text
    error = response.json()
    assert error["code"] == "upstream_error"
    assert "OPENAI_MAX_OUTPUT_TOKENS" in error["error"], error["error"]


def probed_health(server: Gunicorn) -> dict[str, Any]:
    """/health once the model probe, which runs beside the first /health, has its verdict."""
    deadline = time.monotonic() + PROBE_TIMEOUT
    while True:
        health: dict[str, Any] = server.session.get(f"{server.url}/health", timeout=10).json()
        if health["checks"]["openai_probe"] != "checking" or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def sent_image(body: dict[str, Any]) -> bytes:
    """The one JPEG a chat completion carries, decoded from its data URL."""
    parts = [part for part in body["messages"][1]["content"] if part["type"] == "image_url"]
    assert len(parts) == 1
    url: str = parts[0]["image_url"]["url"]
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url.removeprefix(prefix))


def test_a_photo_is_answered_and_the_server_gets_the_image_and_the_schema(
    vision_service: Gunicorn, vision_proxy: RecordingProxy
) -> None:
    response = analyze(vision_service, MEAL)

    assert_answered_or_capped(response)
    [body] = vision_proxy.completions()
    assert body["model"] == MODEL_ALIAS
    assert body["max_tokens"] == int(OUTPUT_TOKENS)
    assert sent_image(body)[:3] == b"\xff\xd8\xff"  # a JPEG, as the service prepares every photo
    schema = body["response_format"]["json_schema"]
    assert schema["schema"] == ANALYSIS_SCHEMA
    assert schema["strict"] is True
    # The server itself took the photo and answered the completion.
    [(_, status, answer)] = vision_proxy.answers
    assert status == 200, answer
    reply = json.loads(answer)
    assert reply["usage"]["prompt_tokens"] > 0
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_probe_finds_the_model_on_the_server(
    vision_service: Gunicorn, vision_proxy: RecordingProxy, llama_vision: LlamaServer
) -> None:
    # llama.cpp serves no GET /v1/models/{id}: its list names the model by the alias it was given.
    single = requests.get(f"{llama_vision.url}/v1/models/{MODEL_ALIAS}", timeout=10)
    assert single.status_code == 404
    listed = requests.get(f"{llama_vision.url}/v1/models", timeout=10).json()
    assert [model["id"] for model in listed["data"]] == [MODEL_ALIAS]

    health = probed_health(vision_service)

    assert health["checks"]["openai_probe"] == "reachable", health
    asked = [request.route for request in vision_proxy.requests if request.method == "GET"]
    assert "/v1/models" in asked


def test_a_server_without_a_projector_refuses_the_photo_in_its_own_words(
    text_service: Gunicorn, text_proxy: RecordingProxy
) -> None:
    response = analyze(text_service, MEAL)

    assert response.status_code == 502, response.text
    error = response.json()
    assert error["code"] == "upstream_error"
    assert "image input is not supported" in error["error"], error["error"]
    statuses = {status for _, status, _ in text_proxy.answers}
    assert statuses == {500}
    refusal = json.loads(text_proxy.answers[0][2])["error"]
    assert refusal["code"] == 500  # llama.cpp's error code is an integer, its HTTP status


def test_what_the_service_learns_about_the_server_holds_for_the_next_photo(
    vision_service: Gunicorn, vision_proxy: RecordingProxy
) -> None:
    first = analyze(vision_service, MEAL)
    second = analyze(vision_service, ANOTHER_MEAL)

    assert_answered_or_capped(first)
    assert_answered_or_capped(second)
    # llama.cpp takes every field the service sends: one completion a photo, the same fields.
    bodies = vision_proxy.completions()
    assert len(bodies) == 2
    assert sorted(bodies[0]) == sorted(bodies[1])
    assert bodies[0]["max_tokens"] == bodies[1]["max_tokens"] == int(OUTPUT_TOKENS)
    assert bodies[0]["temperature"] == bodies[1]["temperature"] == 0
    assert sent_image(bodies[0]) != sent_image(bodies[1])
    assert "refused" not in vision_service.output()
