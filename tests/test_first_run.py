"""What a newcomer sees first: the start-up summary, and errors that say what to do."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient

from tests.conftest import (
    JWT_SECRET,
    OPENAI_API_KEY,
    REDIS_PASSWORD,
    assert_json_error,
    running_gunicorn,
)
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer
from tests.servers import Gunicorn


def test_gunicorn_says_at_start_what_is_configured(
    served: Gunicorn,
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> None:
    output = served.output()
    summary = next(line for line in output.splitlines() if "Image Service: model" in line)
    assert "gpt-6-luna" in summary
    assert model.base_url in summary
    assert user_service.url in summary
    assert f"127.0.0.1:{redis.port}" in summary
    assert "HS256" in summary
    assert "No model is configured" not in output


def test_gunicorn_warns_at_start_when_no_model_is_configured(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    with running_gunicorn(redis, model, user_service, tmp_path, OPENAI_API_KEY=None) as server:
        output = server.output()
    warning = next(line for line in output.splitlines() if "No model is configured" in line)
    assert "WARNING" in warning
    assert "OPENAI_API_KEY" in warning
    assert "OPENAI_BASE_URL" in warning


def test_the_start_up_summary_holds_no_secret(served: Gunicorn) -> None:
    output = served.output()
    for secret in (JWT_SECRET, OPENAI_API_KEY, REDIS_PASSWORD):
        assert secret not in output


def test_an_unknown_path_says_what_the_service_answers(client: FlaskClient) -> None:
    response = client.get("/analyse-food")
    assert_json_error(response, 404, "not_found")
    assert "POST /analyze-food" in response.get_json()["error"]


def test_a_wrong_method_says_which_to_use(client: FlaskClient) -> None:
    response = client.get("/analyze-food")
    assert_json_error(response, 405, "method_not_allowed")
    assert "use POST" in response.get_json()["error"]


def test_an_expired_token_says_how_to_get_a_fresh_one(
    client: FlaskClient, make_token: Callable[..., str]
) -> None:
    token = make_token(exp=int(time.time()) - 60)
    response = client.post("/analyze-food", headers={"Authorization": f"Bearer {token}"})
    assert_json_error(response, 401, "token_expired")
    assert "make token" in response.get_json()["error"]


def test_without_a_model_the_503_names_both_settings(
    client_with: Callable[..., FlaskClient], auth_headers: dict[str, str]
) -> None:
    from tests.conftest import post_photo
    from tests.images import jpeg

    response = post_photo(client_with(openai_api_key=None), auth_headers, jpeg(16, 16))
    assert_json_error(response, 503, "ai_not_configured")
    assert "OPENAI_API_KEY" in response.get_json()["error"]
    assert "OPENAI_BASE_URL" in response.get_json()["error"]


def test_an_unreachable_user_service_is_named_in_the_error_and_the_log(
    client_with: Callable[..., FlaskClient], auth_headers: dict[str, str], logs: Any
) -> None:
    from tests.conftest import post_photo
    from tests.fakes import free_port
    from tests.images import jpeg

    url = f"http://127.0.0.1:{free_port()}"
    response = post_photo(
        client_with(user_service_url=url), auth_headers, jpeg(20, 20), "?save=true"
    )
    assert_json_error(response, 502, "user_service_error")
    assert url in response.get_json()["error"]
    assert "could not be reached" in response.get_json()["error"]
    assert any(url in line and "Error saving food entry" in line for line in logs.lines)
