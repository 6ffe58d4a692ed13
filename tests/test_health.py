"""GET /health and /health/live: the states the contract names, the status codes, and what a
hung Redis costs the probe."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask.testing import FlaskClient

from app import Config, create_app
from tests.conftest import REDIS_PASSWORD
from tests.fakes import StalledServer, free_port


def client_for(config: Config) -> FlaskClient:
    """A test client for an app built from this Config."""
    flask_app = create_app(config)
    flask_app.testing = True
    return flask_app.test_client()


def test_healthy_service_answers_200_with_the_contract_shape(client: FlaskClient) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"status", "service", "startup_mode", "checks"}
    assert body["status"] == "healthy"
    assert body["service"] == "image-service"
    assert body["startup_mode"] is False
    assert body["checks"]["redis"] == "connected"
    assert body["checks"]["openai"] == "configured"
    assert all(isinstance(state, str) for state in body["checks"].values())


def test_missing_openai_key_reports_missing_credentials_with_503(
    make_config: Callable[..., Config],
) -> None:
    client = client_for(make_config(openai_api_key=None))

    response = client.get("/health")

    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"]["openai"] == "missing credentials"
    assert body["status"] == "unhealthy"
    assert body["startup_mode"] is False


def test_startup_grace_answers_200_while_the_body_says_unhealthy(
    make_config: Callable[..., Config],
) -> None:
    client = client_for(make_config(openai_api_key=None, startup_grace_seconds=3600))

    response = client.get("/health")

    assert response.status_code == 200
    body = response.get_json()
    assert body["startup_mode"] is True
    assert body["status"] == "unhealthy"
    assert body["checks"]["openai"] == "missing credentials"


def test_unconfigured_redis_reports_not_configured_and_stays_healthy(
    make_config: Callable[..., Config],
) -> None:
    client = client_for(make_config(with_redis=False))

    response = client.get("/health")

    assert response.status_code == 200
    body = response.get_json()
    assert body["checks"]["redis"] == "not configured"
    assert body["status"] == "healthy"


def test_wrong_redis_password_reports_an_error_with_503(
    make_config: Callable[..., Config],
) -> None:
    client = client_for(make_config(redis_password="wrong"))

    response = client.get("/health")

    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"]["redis"].startswith("error: ")
    assert body["status"] == "unhealthy"


def test_wrong_redis_password_never_appears_in_the_body(
    make_config: Callable[..., Config],
) -> None:
    wrong_password = "wrong-redis-password-Zq81xV"
    client = client_for(make_config(redis_password=wrong_password))

    text = client.get("/health").get_data(as_text=True)

    assert wrong_password not in text
    assert REDIS_PASSWORD not in text


def test_redis_at_a_closed_port_reports_connection_failed_with_503(
    make_config: Callable[..., Config],
) -> None:
    client = client_for(make_config(redis_host="127.0.0.1", redis_port=free_port()))

    response = client.get("/health")

    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"]["redis"] == "connection failed"
    assert body["status"] == "unhealthy"


def test_health_tries_a_hung_redis_once_and_reports_connection_failed(
    make_config: Callable[..., Config], stalled: StalledServer
) -> None:
    # The contract's "well under a second" is one REDIS_TIMEOUT: one attempt, never a retry.
    client = client_for(make_config(redis_host=stalled.host, redis_port=stalled.port))

    response = client.get("/health")

    assert response.status_code == 503
    assert response.get_json()["checks"]["redis"] == "connection failed"
    assert stalled.accepted == 1


def test_liveness_answers_alive_while_redis_is_down(make_config: Callable[..., Config]) -> None:
    client = client_for(make_config(redis_host="127.0.0.1", redis_port=free_port()))

    response = client.get("/health/live")

    assert response.status_code == 200
    assert response.get_json() == {"status": "alive"}


@pytest.mark.parametrize("path", ["/health", "/health/live"])
def test_probes_need_no_token(client: FlaskClient, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 200
    assert "WWW-Authenticate" not in response.headers


def test_jwt_check_reports_configured(client: FlaskClient) -> None:
    assert client.get("/health").get_json()["checks"]["jwt"] == "configured"


def test_jwt_check_reports_missing_secret(make_config: Callable[..., Config]) -> None:
    client = client_for(make_config(jwt_secret=None))

    assert client.get("/health").get_json()["checks"]["jwt"] == "missing secret"


def test_missing_redis_password_reports_an_error_with_503(
    make_config: Callable[..., Config],
) -> None:
    client = client_for(make_config(redis_password=None))

    response = client.get("/health")

    assert response.status_code == 503
    assert response.get_json()["checks"]["redis"].startswith("error: ")
