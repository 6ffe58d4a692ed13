"""No secret ever leaves the service: not in a response, not in a log line."""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import Config, ConfigError, create_app
from tests import images
from tests.conftest import REDIS_PASSWORD, RecordHandler
from tests.fakes import ChatCompletionsServer, Reply, UserServiceServer, free_port

OPENAI_KEY = "sk-hygiene-OPENAI-key-7f3kq9x2"
JWT_SECRET = "jwt-hygiene-SECRET-value-0123456789abcdef"
SECRETS = (OPENAI_KEY, JWT_SECRET, REDIS_PASSWORD)


@pytest.fixture
def hygiene_app(make_config: Callable[..., Config]) -> Iterator[tuple[Flask, RecordHandler]]:
    """An app whose secrets are recognisable, and every line it logs."""
    handler = RecordHandler()
    service_logger = logging.getLogger("image_service")
    service_logger.addHandler(handler)
    config = make_config(openai_api_key=OPENAI_KEY, jwt_secret=JWT_SECRET)
    try:
        yield create_app(config), handler
    finally:
        service_logger.removeHandler(handler)


def post(client: FlaskClient, token: str, photo: bytes, query: str = "") -> str:
    """POST a photo and return everything the caller sees: status, headers and body."""
    response = client.post(
        f"/analyze-food{query}",
        headers={"Authorization": f"Bearer {token}"},
        data={"image": (io.BytesIO(photo), "meal.jpg")},
    )
    return f"{response.status} {dict(response.headers)} {response.get_data(as_text=True)}"


def assert_no_secret(text: str) -> None:
    """None of the configured secrets appears in ``text``."""
    for secret in SECRETS:
        assert secret not in text


def test_no_secret_in_responses_or_logs_across_success_and_failure(
    hygiene_app: tuple[Flask, RecordHandler],
    make_token: Callable[..., str],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> None:
    app, logs = hygiene_app
    client = app.test_client()
    token = make_token(secret=JWT_SECRET)
    seen: list[str] = []
    seen.append(post(client, token, images.jpeg(color=(1, 2, 3)), "?save=true"))
    seen.append(post(client, token, images.jpeg(color=(1, 2, 3))))
    # OpenAI echoes a rejected key in its error message; it must not travel further.
    model.enqueue(model.error(401, f"Incorrect API key provided: {OPENAI_KEY}.", "invalid_api_key"))
    seen.append(post(client, token, images.jpeg(color=(4, 5, 6))))
    model.enqueue(*[model.error(500, f"upstream failed for key {OPENAI_KEY}")] * 3)
    seen.append(post(client, token, images.jpeg(color=(7, 8, 9))))
    user_service.enqueue(Reply(500, {"error": f"bad token {token} secret {JWT_SECRET}"}))
    seen.append(post(client, token, images.jpeg(color=(10, 11, 12)), "?save=true"))
    seen.append(post(client, "not-a-token", images.jpeg()))
    seen.append(post(client, make_token(secret="another-key-" + "x" * 40), images.jpeg()))
    seen.append(post(client, token, b"not an image"))
    health = client.get("/health")
    seen.append(health.get_data(as_text=True))
    seen.append(client.get("/metrics").get_data(as_text=True))
    assert "Incorrect API key provided" in logs.text()
    assert_no_secret("\n".join(seen))
    assert_no_secret(logs.text())


def test_wrong_redis_password_is_not_shown_by_health(
    make_config: Callable[..., Config],
) -> None:
    wrong = "wrong-redis-password-Zz41"
    client = create_app(make_config(redis_password=wrong)).test_client()
    body = client.get("/health").get_data(as_text=True)
    assert "error" in body
    assert wrong not in body
    assert REDIS_PASSWORD not in body


def test_config_errors_do_not_echo_secret_values(tmp_path: object) -> None:
    url = f"cache.internal:6379?password={REDIS_PASSWORD}"
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"REDIS_URL": url, "JWT_PUBLIC_KEY": JWT_SECRET}, str(tmp_path))
    assert_no_secret(str(raised.value))


def test_repr_of_config_shows_no_secret(make_config: Callable[..., Config]) -> None:
    config = make_config(
        openai_api_key=OPENAI_KEY,
        jwt_secret=JWT_SECRET,
        redis_url=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0",
    )
    assert_no_secret(repr(config))
    assert_no_secret(repr(dataclasses.asdict(config).keys()))
