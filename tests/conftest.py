"""Fixtures: an app built from a test Config, and the real collaborators it talks to."""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app import Config, create_app
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer

REDIS_PASSWORD = "redis-test-pw-Kq8zT3"
OPENAI_API_KEY = "openai-test-key-Vb71Pw0x"
JWT_SECRET = "jwt-test-secret-4f9c2a7e1b3d5f60718293a4b5c6d7e8"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One password-protected redis-server of the tests' own, on a free port."""
    server = RedisServer(password=REDIS_PASSWORD)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The tests' Redis, running and empty."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flush()
    return redis_server


@pytest.fixture(scope="session")
def model_server() -> Iterator[ChatCompletionsServer]:
    """A Chat Completions server on loopback."""
    with ChatCompletionsServer() as server:
        yield server


@pytest.fixture
def model(model_server: ChatCompletionsServer) -> ChatCompletionsServer:
    """The model server, with its default answer and an empty record."""
    model_server.reset()
    return model_server


@pytest.fixture(scope="session")
def user_service_server() -> Iterator[UserServiceServer]:
    """A User Service on loopback."""
    with UserServiceServer() as server:
        yield server


@pytest.fixture
def user_service(user_service_server: UserServiceServer) -> UserServiceServer:
    """The User Service, answering 201 and with an empty record."""
    user_service_server.reset()
    return user_service_server


def base_environment(
    redis: RedisServer | None, model: ChatCompletionsServer, user_service: UserServiceServer
) -> dict[str, str]:
    """The environment of a fully configured service pointing at the tests' collaborators."""
    env = {
        "OPENAI_API_KEY": OPENAI_API_KEY,
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_API_TIMEOUT": "2",
        "OPENAI_RETRY_INITIAL_WAIT": "0",
        "OPENAI_RETRY_MAX_WAIT": "0",
        "USER_SERVICE_URL": user_service.url,
        "USER_SERVICE_TIMEOUT": "2",
        "JWT_SECRET": JWT_SECRET,
        "STARTUP_GRACE_SECONDS": "0",
        "LOG_LEVEL": "DEBUG",
    }
    if redis is not None:
        env.update(
            REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis.port), REDIS_PASSWORD=REDIS_PASSWORD
        )
    return env


@pytest.fixture
def make_config(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> Callable[..., Config]:
    """Build a Config for the tests' collaborators; keyword arguments override fields."""
    secrets_dir = tmp_path / "no-secrets"
    secrets_dir.mkdir()

    def build(*, with_redis: bool = True, **overrides: Any) -> Config:
        env = base_environment(redis if with_redis else None, model, user_service)
        config = Config.from_env(env, secrets_dir)
        return dataclasses.replace(config, **overrides)

    return build


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    """The default test Config: Redis, model and User Service all up."""
    return make_config()


@pytest.fixture
def app(config: Config) -> Flask:
    """An app built from the test Config."""
    flask_app = create_app(config)
    flask_app.testing = True
    return flask_app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client for the app."""
    return app.test_client()


@pytest.fixture
def client_with(make_config: Callable[..., Config]) -> Callable[..., FlaskClient]:
    """A test client for an app whose Config differs from the default by some fields."""

    def build(**overrides: Any) -> FlaskClient:
        flask_app = create_app(make_config(**overrides))
        flask_app.testing = True
        return flask_app.test_client()

    return build


def post_photo(
    client: FlaskClient,
    headers: Mapping[str, str],
    data: bytes,
    query: str = "",
    form: Mapping[str, Any] | None = None,
    **options: Any,
) -> TestResponse:
    """POST one photo (and any other form fields) to /analyze-food as a multipart upload."""
    return client.post(
        f"/analyze-food{query}",
        data={"image": (io.BytesIO(data), "meal.jpg"), **(form or {})},
        headers=dict(headers),
        content_type="multipart/form-data",
        **options,
    )


def assert_json_error(response: TestResponse, status: int, code: str) -> None:
    """The contract's error: JSON with a message and a stable code."""
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["code"] == code
    assert isinstance(body["error"], str)
    assert body["error"]


@pytest.fixture
def make_token() -> Callable[..., str]:
    """Sign a token with the test secret; claims override the defaults, None drops one."""

    def sign(secret: str = JWT_SECRET, algorithm: str = "HS256", **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"sub": "user-42", "type": "access", "iat": now, "exp": now + 600}
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(payload, secret, algorithm=algorithm)

    return sign


@pytest.fixture
def auth_headers(make_token: Callable[..., str]) -> dict[str, str]:
    """An Authorization header with a valid access token for user-42."""
    return {"Authorization": f"Bearer {make_token()}"}


class RecordHandler(logging.Handler):
    """Keeps the rendered lines the service logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s [%(request_id)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        """Every line so far, joined."""
        return "\n".join(self.lines)


@pytest.fixture
def logs(app: Flask) -> Iterator[RecordHandler]:
    """The lines the service logs during the test."""
    handler = RecordHandler()
    service_logger = logging.getLogger("image_service")
    service_logger.addHandler(handler)
    try:
        yield handler
    finally:
        service_logger.removeHandler(handler)
