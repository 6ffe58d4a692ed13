"""OPENAI_API=responses: the same photos, schema, caps, retries and errors, the other API."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator

import pytest
from flask.testing import FlaskClient

from app import Config, ConfigError
from prompt import ANALYSIS_SCHEMA, SYSTEM_PROMPT
from tests.conftest import assert_json_error, post_photo
from tests.fakes import ChatCompletionsServer, ResponsesServer
from tests.images import photo

response = ResponsesServer.response
server_error = ResponsesServer.error


@pytest.fixture
def responses() -> Iterator[ResponsesServer]:
    """A Responses server of its own, so what one test teaches the service stays there."""
    with ResponsesServer() as server:
        yield server


@pytest.fixture
def client(client_with: Callable[..., FlaskClient], responses: ResponsesServer) -> FlaskClient:
    """A service that asks the Responses server."""
    return client_with(openai_api="responses", openai_base_url=responses.base_url)


def model_tokens(client: FlaskClient, kind: str) -> float:
    """The token counter of one kind, as /metrics shows it."""
    text = client.get("/metrics").get_data(as_text=True)
    found = re.search(rf'^image_service_model_tokens_total{{kind="{kind}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_photo_is_analysed_over_the_responses_api(
    client: FlaskClient,
    responses: ResponsesServer,
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    answer = post_photo(client, auth_headers, photo(1))
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["analysis"]["name"] == responses.analysis["name"]
    assert model.calls == []
    assert len(responses.calls) == 1
    sent = responses.last_payload()
    assert sent["instructions"] == SYSTEM_PROMPT
    assert sent["store"] is False
    assert sent["text"]["format"] == {
        "type": "json_schema",
        "name": "food_analysis",
        "strict": True,
        "schema": ANALYSIS_SCHEMA,
    }
    assert sent["max_output_tokens"] == Config().openai_max_output_tokens
    assert sent["reasoning"] == {"effort": "none"}
    assert sent["temperature"] == 0
    for chat_field in ("messages", "response_format", "max_completion_tokens", "max_tokens"):
        assert chat_field not in sent
    (message,) = sent["input"]
    assert message["role"] == "user"
    kinds = [part["type"] for part in message["content"]]
    assert kinds[0] == "input_text"
    (image,) = [part for part in message["content"] if part["type"] == "input_image"]
    assert image["detail"] == "auto"
    prefix = "data:image/jpeg;base64,"
    assert image["image_url"].startswith(prefix)
    assert base64.b64decode(image["image_url"][len(prefix) :])[:2] == b"\xff\xd8"


def test_an_answer_cut_short_names_openai_max_output_tokens(
    client: FlaskClient, responses: ResponsesServer, auth_headers: dict[str, str]
) -> None:
    responses.enqueue(response('{"isFood": true, "name": "Sal', incomplete="max_output_tokens"))
    answer = post_photo(client, auth_headers, photo(1))
    assert_json_error(answer, 502, "upstream_error")
    assert "ran out of output tokens" in answer.get_json()["error"]
    assert "OPENAI_MAX_OUTPUT_TOKENS" in answer.get_json()["error"]
    assert len(responses.calls) == 1


def test_a_filtered_answer_says_the_provider_filtered_it(
    client: FlaskClient, responses: ResponsesServer, auth_headers: dict[str, str]
) -> None:
    responses.enqueue(response(None, incomplete="content_filter"))
    answer = post_photo(client, auth_headers, photo(1))
    assert_json_error(answer, 502, "upstream_error")
    assert "filtered" in answer.get_json()["error"]
    assert len(responses.calls) == 1


def test_a_refusal_says_the_model_refused(
    client: FlaskClient, responses: ResponsesServer, auth_headers: dict[str, str]
) -> None:
    responses.enqueue(response(None, refusal="I can't help with that."))
    answer = post_photo(client, auth_headers, photo(1))
    assert_json_error(answer, 502, "upstream_error")
    assert "refused" in answer.get_json()["error"]


def test_a_long_wait_answers_503_at_once_with_the_servers_retry_after(
    client: FlaskClient, responses: ResponsesServer, auth_headers: dict[str, str]
) -> None:
    limited = server_error(429, "Rate limit reached for requests", headers={"retry-after": "120"})
    responses.enqueue(limited)
    answer = post_photo(client, auth_headers, photo(1))
    assert_json_error(answer, 503, "upstream_rate_limited")
    assert answer.headers["Retry-After"] == "120"
    assert len(responses.calls) == 1


def test_the_servers_own_words_reach_the_caller(
    client: FlaskClient, responses: ResponsesServer, auth_headers: dict[str, str]
) -> None:
    responses.enqueue(server_error(400, "Invalid value for 'input'.", param="input"))
    answer = post_photo(client, auth_headers, photo(1))
    assert_json_error(answer, 502, "upstream_error")
    assert "Invalid value for 'input'." in answer.get_json()["error"]
    assert len(responses.calls) == 1


def test_a_refused_temperature_is_learnt_and_left_out(
    client: FlaskClient, responses: ResponsesServer, auth_headers: dict[str, str]
) -> None:
    responses.refused_fields = frozenset({"temperature"})
    assert post_photo(client, auth_headers, photo(1)).status_code == 200
    assert len(responses.calls) == 2
    assert "temperature" not in responses.last_payload()
    assert post_photo(client, auth_headers, photo(2)).status_code == 200
    assert len(responses.calls) == 3
    assert "temperature" not in responses.last_payload()


def test_a_refused_reasoning_effort_is_left_out(
    client: FlaskClient, responses: ResponsesServer, auth_headers: dict[str, str]
) -> None:
    responses.refused_fields = frozenset({"reasoning"})
    assert post_photo(client, auth_headers, photo(1)).status_code == 200
    assert len(responses.calls) == 2
    assert "reasoning" not in responses.last_payload()


def test_reasoning_and_cached_tokens_are_counted(
    client: FlaskClient, responses: ResponsesServer, auth_headers: dict[str, str]
) -> None:
    before = {kind: model_tokens(client, kind) for kind in ("prompt", "reasoning", "cached_prompt")}
    text = json.dumps(responses.analysis)
    responses.enqueue(response(text, reasoning_tokens=700, cached_tokens=640))
    assert post_photo(client, auth_headers, photo(1)).status_code == 200
    assert model_tokens(client, "prompt") - before["prompt"] == 900
    assert model_tokens(client, "reasoning") - before["reasoning"] == 700
    assert model_tokens(client, "cached_prompt") - before["cached_prompt"] == 640


def test_the_api_is_a_setting() -> None:
    assert Config.from_env({}, "/nonexistent").openai_api == "chat"
    assert Config.from_env({"OPENAI_API": "responses"}, "/nonexistent").openai_api == "responses"
    with pytest.raises(ConfigError, match="OPENAI_API"):
        Config.from_env({"OPENAI_API": "assistants"}, "/nonexistent")


def test_a_failed_response_is_the_error_it_holds(
    client: FlaskClient, responses: ResponsesServer, auth_headers: dict[str, str]
) -> None:
    failed = response(None)
    assert isinstance(failed.body, dict)
    failed.body.update(
        status="failed", error={"code": "server_error", "message": "The model broke down."}
    )
    responses.enqueue(failed)
    answer = post_photo(client, auth_headers, photo(1))
    assert_json_error(answer, 502, "upstream_error")
    assert "The model broke down." in answer.get_json()["error"]


def test_an_answer_cut_short_while_reasoning_is_asked_again_with_a_larger_cap(
    client_with: Callable[..., FlaskClient],
    responses: ResponsesServer,
    auth_headers: dict[str, str],
) -> None:
    client = client_with(
        openai_api="responses", openai_base_url=responses.base_url, openai_reasoning_effort="low"
    )
    responses.enqueue(response("", incomplete="max_output_tokens", reasoning_tokens=16000))
    assert post_photo(client, auth_headers, photo(1)).status_code == 200
    caps = [call.json()["max_output_tokens"] for call in responses.calls]
    assert caps == [Config().openai_reasoning_max_output_tokens, 32000]
    assert responses.last_payload()["reasoning"] == {"effort": "low"}
    assert "temperature" not in responses.last_payload()
