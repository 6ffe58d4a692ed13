"""Redis going away, coming back or hanging: analyses go on, /health tells, the cache returns."""

from __future__ import annotations

from collections.abc import Callable

from flask.testing import FlaskClient

from app import Config, create_app
from tests import images
from tests.conftest import RecordHandler, json_answer
from tests.fakes import ChatCompletionsServer, RedisServer, StalledServer


def connect(client: FlaskClient) -> None:
    """Have the app open its pooled Redis connection, so a later outage finds it in use."""
    assert client.get("/health").get_json()["checks"]["redis"] == "connected"


def test_analysis_comes_from_the_model_while_redis_is_down(
    client: FlaskClient,
    auth_headers: dict[str, str],
    redis: RedisServer,
    model: ChatCompletionsServer,
) -> None:
    connect(client)
    redis.stop()

    body = json_answer(client, auth_headers, images.jpeg())

    assert body["source"] == "api"
    assert len(model.calls) == 1


def test_redis_outage_is_logged_as_a_connection_error(
    client: FlaskClient,
    auth_headers: dict[str, str],
    redis: RedisServer,
    logs: RecordHandler,
) -> None:
    connect(client)
    redis.stop()

    json_answer(client, auth_headers, images.jpeg())

    assert "Redis connection error" in logs.text()


def test_health_reports_connection_failed_while_redis_is_down(
    client: FlaskClient, redis: RedisServer
) -> None:
    connect(client)
    redis.stop()

    response = client.get("/health")

    assert response.status_code == 503
    assert response.get_json()["checks"]["redis"] == "connection failed"


def test_cache_is_used_again_once_health_sees_redis_back(
    client: FlaskClient,
    auth_headers: dict[str, str],
    redis: RedisServer,
    model: ChatCompletionsServer,
) -> None:
    json_answer(client, auth_headers, images.jpeg(color=(10, 20, 30)))
    redis.stop()
    json_answer(client, auth_headers, images.jpeg(color=(40, 50, 60)))
    redis.start()
    assert client.get("/health").get_json()["checks"]["redis"] == "connected"
    photo = images.jpeg(color=(70, 80, 90))

    first = json_answer(client, auth_headers, photo)
    second = json_answer(client, auth_headers, photo)

    assert first["source"] == "api"
    assert second["source"] == "cache"
    assert len(model.calls) == 3
    assert client.get("/health").get_json()["checks"]["redis"] == "connected"


def test_analysis_succeeds_when_redis_hangs_and_asks_it_once(
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    stalled: StalledServer,
) -> None:
    flask_app = create_app(make_config(redis_host=stalled.host, redis_port=stalled.port))
    flask_app.testing = True

    body = json_answer(flask_app.test_client(), auth_headers, images.jpeg())

    assert body["source"] == "api"
    assert len(model.calls) == 1
    # One timeout, then the request skips Redis: what keeps a hung Redis from adding more.
    assert stalled.accepted == 1
