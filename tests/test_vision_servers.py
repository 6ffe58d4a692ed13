"""Today's models and OpenAI-compatible servers: what each takes, learnt from what each answers."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from flask.testing import FlaskClient

from app import Config, ConfigError, create_app
from tests.conftest import OPENAI_API_KEY, assert_json_error, post_photo
from tests.fakes import (
    GPT6_EFFORTS,
    MISTRAL_FIELDS,
    ChatCompletionsServer,
    Reply,
    StalledServer,
    free_port,
)
from tests.images import photo

if TYPE_CHECKING:
    from tests.conftest import RecordHandler

completion = ChatCompletionsServer.completion
model_error = ChatCompletionsServer.error


def analyse(client: FlaskClient, headers: dict[str, str], shade: int = 1) -> dict[str, Any]:
    """POST a photo, expect 200, and give the body."""
    response = post_photo(client, headers, photo(shade))
    assert response.status_code == 200, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def model_tokens(client: FlaskClient, kind: str) -> float:
    """The token counter of one kind, as /metrics shows it."""
    text = client.get("/metrics").get_data(as_text=True)
    found = re.search(rf'^image_service_model_tokens_total{{kind="{kind}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def gpt5(model: ChatCompletionsServer) -> ChatCompletionsServer:
    """A server that answers as OpenAI does for gpt-5-mini: reasoning out of the output cap."""
    model.reasoning_tokens = 1500
    return model


@pytest.fixture
def gpt6(model: ChatCompletionsServer) -> ChatCompletionsServer:
    """A server that answers as OpenAI does for gpt-6-luna: it reasons unless told `none`."""
    model.reasoning_tokens = 1500
    model.efforts = GPT6_EFFORTS
    return model


@pytest.fixture
def mistral(model: ChatCompletionsServer) -> ChatCompletionsServer:
    """A server that refuses, as Mistral's does, every field it does not know with a 422."""
    model.known_fields = MISTRAL_FIELDS
    return model


# ------------------------------------------------------------------ reasoning models


def test_with_no_model_settings_gpt_6_luna_is_asked_once_at_effort_none(
    client: FlaskClient, gpt6: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    analyse(client, auth_headers)
    assert len(gpt6.calls) == 1
    sent = gpt6.last_payload()
    assert sent["model"] == "gpt-6-luna"
    assert sent["reasoning_effort"] == "none"
    assert sent["temperature"] == 0
    assert sent["max_completion_tokens"] == Config().openai_max_output_tokens
    assert "max_tokens" not in sent


@pytest.mark.parametrize("effort", sorted(GPT6_EFFORTS - {"none"}))
def test_gpt6_at_a_reasoning_effort_gets_the_reasoning_cap_and_no_temperature(
    client_with: Callable[..., FlaskClient],
    gpt6: ChatCompletionsServer,
    auth_headers: dict[str, str],
    effort: str,
) -> None:
    analyse(client_with(openai_reasoning_effort=effort), auth_headers)
    assert len(gpt6.calls) == 1
    sent = gpt6.last_payload()
    assert sent["reasoning_effort"] == effort
    assert "temperature" not in sent
    assert sent["max_completion_tokens"] == Config().openai_reasoning_max_output_tokens


def test_effort_none_is_not_sent_to_a_model_not_known_to_reason(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    analyse(client_with(openai_model="llava"), auth_headers)
    sent = model.last_payload()
    assert "reasoning_effort" not in sent
    assert sent["temperature"] == 0
    assert sent["max_tokens"] == Config().openai_max_output_tokens


def test_a_deployment_of_gpt6_unknown_by_name_costs_one_extra_call_once(
    client_with: Callable[..., FlaskClient],
    gpt6: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    client = client_with(openai_model="food-photos-deployment")
    analyse(client, auth_headers, 1)
    first, second = (call.json() for call in gpt6.calls)
    assert "reasoning_effort" not in first
    assert second["reasoning_effort"] == "none"
    assert second["temperature"] == 0
    analyse(client, auth_headers, 2)
    assert len(gpt6.calls) == 3


def test_gpt5_mini_refusing_effort_none_reasons_at_its_default_after_one_extra_call(
    client_with: Callable[..., FlaskClient],
    gpt5: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    client = client_with(openai_model="gpt-5-mini")
    analyse(client, auth_headers, 1)
    first, second = (call.json() for call in gpt5.calls)
    assert (first["reasoning_effort"], first["temperature"]) == ("none", 0)
    assert "reasoning_effort" not in second
    assert "temperature" not in second
    assert second["max_completion_tokens"] == Config().openai_reasoning_max_output_tokens
    analyse(client, auth_headers, 2)
    assert len(gpt5.calls) == 3


def test_gpt5_mini_at_an_effort_it_takes_answers_200_in_one_call(
    client_with: Callable[..., FlaskClient],
    gpt5: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    client = client_with(openai_model="gpt-5-mini", openai_reasoning_effort="low")
    analyse(client, auth_headers, 1)
    assert len(gpt5.calls) == 1
    analyse(client, auth_headers, 2)
    assert len(gpt5.calls) == 2
    sent = gpt5.last_payload()
    assert sent["max_completion_tokens"] == Config().openai_reasoning_max_output_tokens
    assert "max_tokens" not in sent
    assert "temperature" not in sent


@pytest.mark.parametrize(
    "name",
    [
        "gpt-6-luna",
        "gpt-6-sol",
        "gpt-6-astra",
        "gpt-5.1",
        "gpt-5",
        "gpt-5-nano",
        "o3",
        "o4-mini",
        "o1",
        "openai/gpt-6-luna",
    ],
)
def test_reasoning_models_are_known_by_their_family(
    client_with: Callable[..., FlaskClient],
    gpt5: ChatCompletionsServer,
    auth_headers: dict[str, str],
    name: str,
) -> None:
    analyse(client_with(openai_model=name, openai_reasoning_effort="medium"), auth_headers)
    assert len(gpt5.calls) == 1


@pytest.mark.parametrize("name", ["gpt-5-chat-latest", "gpt-60", "gpt-4.1-mini", "omni-vision"])
def test_other_models_are_not_taken_for_reasoning_ones(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
    name: str,
) -> None:
    analyse(client_with(openai_model=name), auth_headers)
    assert model.last_payload()["max_tokens"] == Config().openai_max_output_tokens


def test_a_reasoning_model_unknown_by_name_is_learnt_from_its_refusals(
    client_with: Callable[..., FlaskClient],
    gpt5: ChatCompletionsServer,
    auth_headers: dict[str, str],
    logs: RecordHandler,
) -> None:
    client = client_with(openai_model="food-photos-deployment", openai_reasoning_effort="medium")
    analyse(client, auth_headers, 1)
    first, second, third = (call.json() for call in gpt5.calls)
    assert first["max_tokens"] == Config().openai_max_output_tokens
    assert second["max_completion_tokens"] == Config().openai_reasoning_max_output_tokens
    assert "max_tokens" not in second
    assert "temperature" not in third
    learnt = [line for line in logs.lines if "The vision model's server" in line]
    assert len(learnt) == 2
    assert all(line.startswith("INFO") for line in learnt)

    analyse(client, auth_headers, 2)
    assert len(gpt5.calls) == 4
    assert len([line for line in logs.lines if "The vision model's server" in line]) == 2


def test_what_one_worker_learnt_is_used_by_another(
    make_config: Callable[..., Config], gpt5: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    config = make_config(openai_model="food-photos-deployment")
    first_worker, second_worker = (create_app(config).test_client() for _ in range(2))
    analyse(first_worker, auth_headers, 1)
    assert len(gpt5.calls) == 3
    analyse(second_worker, auth_headers, 2)
    assert len(gpt5.calls) == 4


def test_without_redis_a_worker_keeps_what_it_learnt(
    make_config: Callable[..., Config], gpt5: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    client = create_app(make_config(with_redis=False, openai_model="my-o-model")).test_client()
    analyse(client, auth_headers, 1)
    analyse(client, auth_headers, 2)
    assert len(gpt5.calls) == 4


def test_what_was_learnt_is_kept_per_base_url(
    make_config: Callable[..., Config],
    gpt5: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    config = make_config(openai_model="food-photos-deployment")
    analyse(create_app(config).test_client(), auth_headers, 1)
    assert len(gpt5.calls) == 3
    other_url = make_config(
        openai_model="food-photos-deployment",
        openai_base_url=gpt5.base_url.replace("127.0.0.1", "localhost"),
    )
    analyse(create_app(other_url).test_client(), auth_headers, 2)
    assert len(gpt5.calls) == 6


def test_what_was_learnt_is_kept_per_effort(
    make_config: Callable[..., Config],
    gpt5: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    medium = make_config(openai_model="food-photos-deployment", openai_reasoning_effort="medium")
    analyse(create_app(medium).test_client(), auth_headers, 1)
    assert len(gpt5.calls) == 3
    low = make_config(openai_model="food-photos-deployment", openai_reasoning_effort="low")
    analyse(create_app(low).test_client(), auth_headers, 2)
    assert len(gpt5.calls) == 6


def test_reasoning_effort_is_sent_when_configured(
    client_with: Callable[..., FlaskClient],
    gpt5: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    analyse(client_with(openai_model="gpt-5-mini", openai_reasoning_effort="low"), auth_headers)
    assert gpt5.last_payload()["reasoning_effort"] == "low"


def test_an_answer_cut_short_by_reasoning_is_asked_again_with_a_larger_cap(
    client_with: Callable[..., FlaskClient],
    gpt5: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    cap = Config().openai_reasoning_max_output_tokens
    gpt5.reasoning_tokens = cap + 1000
    analyse(client_with(openai_model="gpt-5-mini", openai_reasoning_effort="medium"), auth_headers)
    first, second = (call.json()["max_completion_tokens"] for call in gpt5.calls)
    assert first == cap
    assert second > gpt5.reasoning_tokens + gpt5.answer_tokens


def test_an_answer_cut_short_twice_names_the_setting_to_raise(
    client_with: Callable[..., FlaskClient],
    gpt5: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    gpt5.reasoning_tokens = 120_000
    client = client_with(openai_model="gpt-5-mini", openai_reasoning_effort="medium")
    response = post_photo(client, auth_headers, photo(1))
    assert_json_error(response, 502, "upstream_error")
    message = response.get_json()["error"]
    assert "ran out of output tokens" in message
    assert "OPENAI_MAX_OUTPUT_TOKENS" in message
    assert "OPENAI_REASONING_MAX_OUTPUT_TOKENS" in message
    assert len(gpt5.calls) == 2


def test_a_model_that_reports_reasoning_tokens_is_given_the_reasoning_cap(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    cut = completion("", finish_reason="length")
    assert isinstance(cut.body, dict)
    cut.body["usage"]["completion_tokens_details"] = {"reasoning_tokens": 800}
    model.enqueue(cut)
    analyse(client_with(openai_model="qwen3-vl"), auth_headers)
    first, second = (call.json()["max_tokens"] for call in model.calls)
    assert first == Config().openai_max_output_tokens
    assert second == Config().openai_reasoning_max_output_tokens


# ------------------------------------------------------------------ finish_reason


def test_answer_cut_short_names_openai_max_output_tokens(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(completion('{"isFood": true, "name": "Sal', finish_reason="length"))
    response = post_photo(client, auth_headers, photo(1))
    assert_json_error(response, 502, "upstream_error")
    assert "ran out of output tokens" in response.get_json()["error"]
    assert "OPENAI_MAX_OUTPUT_TOKENS" in response.get_json()["error"]
    assert len(model.calls) == 1


def test_a_complete_answer_that_says_length_is_used(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(completion(json.dumps(model.analysis), finish_reason="length"))
    assert analyse(client, auth_headers)["analysis"]["name"] == model.analysis["name"]


def test_filtered_answer_says_the_provider_filtered_it(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(completion(None, finish_reason="content_filter"))
    response = post_photo(client, auth_headers, photo(1))
    assert_json_error(response, 502, "upstream_error")
    assert "filtered" in response.get_json()["error"]
    assert len(model.calls) == 1


# ------------------------------------------------------------------ servers that refuse fields


def test_gpt5_mini_on_a_server_that_refuses_unknown_fields_answers_200(
    client_with: Callable[..., FlaskClient],
    mistral: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    client = client_with(openai_model="gpt-5-mini", openai_reasoning_effort="medium")
    analyse(client, auth_headers, 1)
    first, second, third = (call.json() for call in mistral.calls)
    assert "max_completion_tokens" in first
    assert "max_completion_tokens" not in second
    assert second["max_tokens"] == Config().openai_reasoning_max_output_tokens
    assert "reasoning_effort" not in third
    analyse(client, auth_headers, 2)
    assert len(mistral.calls) == 4


def test_a_plain_model_on_a_server_that_refuses_unknown_fields_costs_one_call(
    client_with: Callable[..., FlaskClient],
    mistral: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    analyse(client_with(openai_model="pixtral-large-latest"), auth_headers)
    assert len(mistral.calls) == 1
    assert mistral.last_payload()["temperature"] == 0


def test_a_refused_reasoning_effort_is_left_out(
    client_with: Callable[..., FlaskClient],
    mistral: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    analyse(
        client_with(openai_model="magistral-medium", openai_reasoning_effort="high"), auth_headers
    )
    first, second = (call.json() for call in mistral.calls)
    assert first["reasoning_effort"] == "high"
    assert "reasoning_effort" not in second


def test_a_server_refusing_both_cap_fields_gets_asked_twice_only(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    model.known_fields = MISTRAL_FIELDS - {"max_tokens"}
    response = post_photo(client_with(openai_model="gpt-5-mini"), auth_headers, photo(1))
    assert_json_error(response, 502, "upstream_error")
    assert "max_tokens" in response.get_json()["error"]
    assert len(model.calls) == 2


# ------------------------------------------------------------------ waits the server asks for


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "120"},
        {"retry-after-ms": "119500"},
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2m0s"},
    ],
)
def test_a_long_wait_answers_503_at_once_with_the_servers_retry_after(
    client: FlaskClient,
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
    headers: dict[str, str],
) -> None:
    model.enqueue(model_error(429, "Rate limit reached for requests", headers=headers))
    response = post_photo(client, auth_headers, photo(1))
    assert_json_error(response, 503, "upstream_rate_limited")
    assert response.headers["Retry-After"] == "120"
    assert len(model.calls) == 1


def test_a_short_wait_is_waited_and_retried(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(model_error(429, "Rate limit reached", headers={"retry-after-ms": "10"}))
    analyse(client, auth_headers)
    assert len(model.calls) == 2


def test_should_retry_false_is_not_retried(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(model_error(500, headers={"x-should-retry": "false"}))
    assert_json_error(post_photo(client, auth_headers, photo(1)), 502, "upstream_error")
    assert len(model.calls) == 1


def test_should_retry_true_is_retried(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(model_error(400, "Try again", headers={"x-should-retry": "true"}))
    analyse(client, auth_headers)
    assert len(model.calls) == 2


def test_a_rate_limit_that_asks_not_to_retry_gives_its_wait_to_the_caller(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(
        model_error(429, "Slow down", headers={"retry-after": "3", "x-should-retry": "false"})
    )
    response = post_photo(client, auth_headers, photo(1))
    assert_json_error(response, 503, "upstream_rate_limited")
    assert response.headers["Retry-After"] == "3"
    assert len(model.calls) == 1


# ------------------------------------------------------------------ every error shape


GEMINI_ERROR = [
    {
        "error": {
            "code": 400,
            "message": 'Invalid JSON payload received. Unknown name "foo": Cannot find field.',
            "status": "INVALID_ARGUMENT",
        }
    }
]


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (
            Reply(
                400,
                {
                    "error": {
                        "message": "Invalid image: the data URL is not a valid image.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_image_format",
                    }
                },
            ),
            "Invalid image: the data URL is not a valid image.",
        ),
        (
            Reply(
                400,
                {
                    "object": "error",
                    "message": "This model's maximum context length is 8192 tokens.",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                },
            ),
            "This model's maximum context length is 8192 tokens.",
        ),
        (
            Reply(
                422,
                {
                    "object": "error",
                    "message": {
                        "detail": [
                            {
                                "type": "missing",
                                "loc": ["body", "messages"],
                                "msg": "Field required",
                                "input": {},
                            }
                        ]
                    },
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                },
            ),
            "body.messages: Field required",
        ),
        (Reply(400, GEMINI_ERROR), 'Unknown name "foo": Cannot find field.'),
        (Reply(400, {"error": "Model does not support images"}), "Model does not support images"),
        (Reply(400, "model 'llava' not found, try pulling it first"), "try pulling it first"),
        (
            Reply(200, {"error": {"message": "Provider returned error", "code": 400}}),
            "Provider returned error",
        ),
        (
            Reply(200, {"error": {"message": "No endpoints found that support image input"}}),
            "No endpoints found that support image input",
        ),
    ],
    ids=["openai", "vllm", "mistral", "gemini", "lm-studio", "text", "200-code", "200-plain"],
)
def test_the_servers_own_words_reach_the_caller_and_the_log(
    client: FlaskClient,
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
    logs: RecordHandler,
    reply: Reply,
    words: str,
) -> None:
    model.enqueue(reply)
    response = post_photo(client, auth_headers, photo(1))
    assert_json_error(response, 502, "upstream_error")
    assert words in response.get_json()["error"]
    assert any("OpenAI API request failed" in line and words in line for line in logs.lines)
    assert len(model.calls) == 1


def test_a_long_upstream_message_is_shortened_for_the_caller(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(model_error(400, "word " * 2000))
    message = post_photo(client, auth_headers, photo(1)).get_json()["error"]
    assert len(message) < 500


def test_the_api_key_in_an_upstream_message_never_reaches_the_caller(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(model_error(400, f"Incorrect API key provided: {OPENAI_API_KEY}."))
    response = post_photo(client, auth_headers, photo(1))
    assert OPENAI_API_KEY not in response.get_data(as_text=True)
    assert "[redacted]" in response.get_json()["error"]


def test_a_rejected_key_says_so(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(model_error(401, "Incorrect API key provided.", "invalid_api_key"))
    response = post_photo(client, auth_headers, photo(1))
    assert_json_error(response, 502, "upstream_error")
    assert "rejected the API key" in response.get_json()["error"]
    assert "OPENAI_API_KEY" in response.get_json()["error"]


def test_not_found_names_the_model_and_the_base_url(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(model_error(404, "The model `gpt-4.1-mini` does not exist", "model_not_found"))
    message = post_photo(client, auth_headers, photo(1)).get_json()["error"]
    assert "OPENAI_MODEL" in message
    assert model.base_url in message
    assert "/v1" not in message.split(model.base_url, 1)[1]


def test_not_found_on_a_base_url_without_v1_suggests_it(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    response = post_photo(client_with(openai_base_url=model.url + "/api"), auth_headers, photo(1))
    assert_json_error(response, 502, "upstream_error")
    assert "end in /v1" in response.get_json()["error"]


# ------------------------------------------------------------------ usage and provenance


def test_reasoning_and_cached_tokens_are_counted(
    client_with: Callable[..., FlaskClient],
    gpt5: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    client = client_with(openai_model="gpt-5-mini")
    before = model_tokens(client, "reasoning")
    cached = completion(json.dumps(gpt5.analysis))
    assert isinstance(cached.body, dict)
    cached.body["usage"]["prompt_tokens_details"] = {"cached_tokens": 640}
    cached_before = model_tokens(client, "cached_prompt")
    analyse(client, auth_headers, 1)
    gpt5.enqueue(cached)
    analyse(client, auth_headers, 2)
    assert model_tokens(client, "reasoning") - before == gpt5.reasoning_tokens
    assert model_tokens(client, "cached_prompt") - cached_before == 640


def test_the_upstream_request_id_is_logged(
    client: FlaskClient,
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
    logs: RecordHandler,
) -> None:
    model.enqueue(
        Reply(500, {"error": {"message": "boom"}}, headers={"x-request-id": "req_abc123"})
    )
    analyse(client, auth_headers)
    assert any("req_abc123" in line and "failed" in line for line in logs.lines)
    assert any(
        re.search(r"answered HTTP 200 .*upstream request id req_", line) for line in logs.lines
    )


# ------------------------------------------------------------------ knobs for other servers


def test_strict_schema_can_be_turned_off(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    analyse(client_with(openai_strict_schema=False), auth_headers)
    assert model.last_payload()["response_format"]["json_schema"]["strict"] is False


def test_extra_body_is_merged_into_every_request(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    extra = {"provider": {"order": ["openai"]}, "top_k": 20}
    analyse(client_with(openai_extra_body=extra), auth_headers)
    sent = model.last_payload()
    assert sent["provider"] == {"order": ["openai"]}
    assert sent["top_k"] == 20


def test_azure_classic_sends_api_version_and_api_key_header(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    client = client_with(openai_api_version="2024-10-21", openai_api_key_header="api-key")
    analyse(client, auth_headers)
    call = model.calls[-1]
    assert call.path.endswith("/chat/completions?api-version=2024-10-21")
    assert call.header("api-key") == OPENAI_API_KEY
    assert call.header("authorization") is None


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("OPENAI_STRICT_SCHEMA", "off", "openai_strict_schema", False),
        ("OPENAI_EXTRA_BODY", '{"top_k": 20}', "openai_extra_body", {"top_k": 20}),
        ("OPENAI_API_VERSION", "2024-10-21", "openai_api_version", "2024-10-21"),
        ("OPENAI_API_KEY_HEADER", "api-key", "openai_api_key_header", "api-key"),
        ("OPENAI_REASONING_EFFORT", "minimal", "openai_reasoning_effort", "minimal"),
        ("OPENAI_REASONING_EFFORT", "XHIGH", "openai_reasoning_effort", "xhigh"),
        ("OPENAI_REASONING_EFFORT", "max", "openai_reasoning_effort", "max"),
        (
            "OPENAI_REASONING_MAX_OUTPUT_TOKENS",
            "32000",
            "openai_reasoning_max_output_tokens",
            32000,
        ),
        ("OPENAI_PROBE_SECONDS", "60", "openai_probe_seconds", 60.0),
        ("OPENAI_SHUTDOWN_WARN_DAYS", "90", "openai_shutdown_warn_days", 90),
    ],
)
def test_model_settings_are_read_from_the_environment(
    variable: str, value: str, field: str, expected: Any
) -> None:
    config = Config.from_env({variable: value}, "/nonexistent")
    assert getattr(config, field) == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OPENAI_STRICT_SCHEMA", "maybe"),
        ("OPENAI_EXTRA_BODY", "[1, 2]"),
        ("OPENAI_EXTRA_BODY", "{not json"),
        ("OPENAI_API_KEY_HEADER", "api key"),
        ("OPENAI_REASONING_EFFORT", "extreme"),
        ("OPENAI_SHUTDOWN_WARN_DAYS", "-1"),
        ("OPENAI_SHUTDOWN_WARN_DAYS", "1000"),
    ],
)
def test_bad_model_settings_are_named(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Config.from_env({variable: value}, "/nonexistent")


# ------------------------------------------------------------------ the /health probe

# A bound on a probe that never ends, not a measure: the probe's own request gives up sooner.
PROBE_FINISHES_WITHIN = 10.0  # seconds


def health_and_its_probe(client: FlaskClient) -> dict[str, Any]:
    """Ask /health, and wait for the probe it starts beside the request (if any) to finish."""
    running = set(threading.enumerate())
    body: dict[str, Any] = client.get("/health").get_json()
    for thread in set(threading.enumerate()) - running:
        if thread.name == "openai-probe":
            thread.join(timeout=PROBE_FINISHES_WITHIN)
            assert not thread.is_alive(), "the probe never finished"
    return body


def wait_for_probe(client: FlaskClient, expected: str) -> dict[str, Any]:
    """/health once the probe's verdict shows (it runs beside the requests)."""
    health_and_its_probe(client)
    body: dict[str, Any] = client.get("/health").get_json()
    assert body["checks"]["openai_probe"] == expected, body
    return body


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "reachable"),
        (401, "key rejected"),
        (404, "model not found"),
        (500, "error (HTTP 500)"),
    ],
)
def test_health_probe_tells_what_the_model_server_says(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    status: int,
    verdict: str,
) -> None:
    model.model_status = status
    client = client_with()
    body = wait_for_probe(client, verdict)
    assert body["checks"]["openai_probe"] == verdict
    assert body["status"] == "healthy"
    assert model.probes[0].route == "/v1/models/gpt-6-luna"
    assert model.probes[0].header("authorization") == f"Bearer {OPENAI_API_KEY}"


# llama.cpp's server: no GET /v1/models/{id} (404 for every model), a listing with the model's
# file or alias in data[].id (and aliases), and an Ollama-style models list beside it.
LLAMA_CPP_LISTING = {
    "models": [
        {
            "name": "models/meal-vision.gguf",
            "model": "models/meal-vision.gguf",
            "modified_at": "",
            "size": "",
            "digest": "",
            "type": "model",
            "description": "",
            "tags": [""],
            "capabilities": ["completion", "multimodal"],
            "parameters": "",
            "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""]},
        }
    ],
    "object": "list",
    "data": [
        {
            "id": "models/meal-vision.gguf",
            "aliases": ["gpt-6-luna"],
            "tags": [],
            "object": "model",
            "created": 1796310000,
            "owned_by": "llamacpp",
            "meta": {"vocab_type": 1, "n_vocab": 262144, "n_ctx_train": 32768},
        }
    ],
}


@pytest.mark.parametrize(
    "listing",
    [
        LLAMA_CPP_LISTING,
        {"object": "list", "data": [{"id": "gpt-6-luna", "object": "model", "owned_by": "me"}]},
        {"models": [{"name": "gpt-6-luna", "model": "gpt-6-luna"}]},
    ],
    ids=["llama.cpp alias", "listed by id", "listed by name"],
)
def test_a_model_the_server_only_lists_is_reachable(
    client_with: Callable[..., FlaskClient], model: ChatCompletionsServer, listing: dict[str, Any]
) -> None:
    model.model_status = 404
    model.model_listing = listing
    body = wait_for_probe(client_with(), "reachable")
    assert body["checks"]["openai_probe"] == "reachable"
    assert [probe.route for probe in model.probes] == ["/v1/models/gpt-6-luna", "/v1/models"]


@pytest.mark.parametrize(
    "listing",
    [None, {"object": "list", "data": [{"id": "gpt-4.1-mini"}]}, {"data": "everything"}],
    ids=["no listing", "another model", "not a listing"],
)
def test_a_model_in_neither_the_lookup_nor_the_listing_is_not_found(
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    listing: dict[str, Any] | None,
) -> None:
    model.model_status = 404
    model.model_listing = listing
    assert wait_for_probe(client_with(), "model not found")["status"] == "healthy"


def test_a_model_the_server_describes_needs_no_listing(
    client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    model.model_listing = {"object": "list", "data": []}
    wait_for_probe(client_with(), "reachable")
    assert [probe.route for probe in model.probes] == ["/v1/models/gpt-6-luna"]


def test_health_probe_of_an_unreachable_server(
    client_with: Callable[..., FlaskClient],
) -> None:
    client = client_with(openai_base_url=f"http://127.0.0.1:{free_port()}/v1")
    body = wait_for_probe(client, "unreachable")
    assert body["checks"]["openai_probe"] == "unreachable"
    assert body["status"] == "healthy"


def test_health_probes_at_most_once_per_period(
    client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    client = client_with()
    wait_for_probe(client, "reachable")
    for _ in range(5):
        client.get("/health")
    assert len(model.probes) == 1


def test_health_probe_is_repeated_after_its_period(
    watched: Callable[..., FlaskClient], model: ChatCompletionsServer, clock: MovableClock
) -> None:
    client = watched(openai_probe_seconds=60.0)
    wait_for_probe(client, "reachable")
    model.model_status = 404
    clock.advance(59.0)
    for _ in range(5):
        client.get("/health")
    assert len(model.probes) == 1
    clock.advance(1.0)
    assert wait_for_probe(client, "model not found")["checks"]["openai_probe"] == "model not found"


def test_health_does_not_wait_for_a_stalled_probe(
    client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    with StalledServer() as stalled:
        client = client_with(openai_base_url=stalled.http_url + "/v1")
        body = client.get("/health").get_json()
        assert body["checks"]["openai_probe"] == "checking"
        assert client.get("/health").get_json()["checks"]["openai_probe"] == "checking"


def test_health_probe_says_not_configured_without_a_key(
    client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    client = client_with(openai_api_key=None)
    assert client.get("/health").get_json()["checks"]["openai_probe"] == "not configured"
    assert model.probes == []


def test_health_probe_can_be_disabled(
    client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    client = client_with(openai_probe_seconds=0.0)
    assert client.get("/health").get_json()["checks"]["openai_probe"] == "disabled"
    assert model.probes == []


# ------------------------------------------------------------------ the model's shutdown date


TODAY = date(2026, 12, 3)


class MovableDay:
    """The probe's clock: a date the test sets and moves on, never the wall clock."""

    def __init__(self, day: date) -> None:
        self.day = day

    def __call__(self) -> date:
        """The day it is now set to."""
        return self.day

    def advance(self, days: int) -> None:
        """Move the clock on by whole days."""
        self.day += timedelta(days=days)


class MovableClock:
    """The probe's interval clock: seconds the test moves on, never the wall clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        """The seconds it is now set to."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock on."""
        self.now += seconds


@pytest.fixture
def day() -> MovableDay:
    """The day the probe takes for today."""
    return MovableDay(TODAY)


@pytest.fixture
def clock() -> MovableClock:
    """The clock the probe's interval is counted on."""
    return MovableClock()


@pytest.fixture
def watched(
    make_config: Callable[..., Config], day: MovableDay, clock: MovableClock
) -> Callable[..., FlaskClient]:
    """A test client whose probe reads `day` and `clock`; keywords override Config fields."""

    def build(**overrides: Any) -> FlaskClient:
        flask_app = create_app(make_config(**overrides), today=day, probe_clock=clock)
        flask_app.testing = True
        return flask_app.test_client()

    return build


def announce(model: ChatCompletionsServer, days_ahead: int) -> str:
    """Have GET /models/{id} name a shutdown date this many days after TODAY; the date."""
    shutdown = (TODAY + timedelta(days=days_ahead)).isoformat()
    model.model_fields = {"shutdown_date": shutdown}
    return shutdown


def shutdown_lines(logs: RecordHandler, level: str) -> list[str]:
    """The lines of one level that speak of the model's shutdown."""
    return [line for line in logs.lines if line.startswith(level) and "shut" in line]


def probe_times(
    client: FlaskClient, model: ChatCompletionsServer, clock: MovableClock, count: int
) -> None:
    """Ask /health, a probe period later each time, until `count` probes have finished.

    Each round moves the clock past the probe's period and lets the probe /health starts finish,
    so each round is one probe.
    """
    for _ in range(count + 1):
        if len(model.probes) >= count + 1:
            return
        clock.advance(Config().openai_probe_seconds)
        health_and_its_probe(client)
    assert len(model.probes) >= count + 1, f"{len(model.probes)} probes, not {count + 1}"


def test_a_shutdown_30_days_away_shows_on_health_and_warns(
    watched: Callable[..., FlaskClient], model: ChatCompletionsServer, logs: RecordHandler
) -> None:
    shutdown = announce(model, 30)
    body = wait_for_probe(watched(), "reachable")
    assert body["checks"]["openai_model_shutdown"] == shutdown
    assert body["checks"]["openai_probe"] == "reachable"
    assert body["status"] == "healthy"
    (warning,) = shutdown_lines(logs, "WARNING")
    assert "gpt-6-luna" in warning
    assert shutdown in warning
    assert "OPENAI_MODEL" in warning
    assert any(shutdown in line for line in shutdown_lines(logs, "INFO"))


def test_a_shutdown_date_past_is_logged_as_an_error(
    watched: Callable[..., FlaskClient], model: ChatCompletionsServer, logs: RecordHandler
) -> None:
    shutdown = announce(model, -1)
    body = wait_for_probe(watched(openai_model="gpt-4.1-mini"), "reachable")
    assert body["checks"]["openai_model_shutdown"] == shutdown
    assert body["status"] == "healthy"
    (error,) = shutdown_lines(logs, "ERROR")
    assert "gpt-4.1-mini" in error
    assert shutdown in error
    assert "OPENAI_MODEL" in error
    assert shutdown_lines(logs, "WARNING") == []


def test_a_shutdown_beyond_the_warning_days_is_only_said_once(
    watched: Callable[..., FlaskClient], model: ChatCompletionsServer, logs: RecordHandler
) -> None:
    shutdown = announce(model, Config().openai_shutdown_warn_days + 1)
    body = wait_for_probe(watched(), "reachable")
    assert body["checks"]["openai_model_shutdown"] == shutdown
    assert [line for line in shutdown_lines(logs, "INFO") if shutdown in line]
    assert shutdown_lines(logs, "WARNING") == []


def test_the_warning_days_are_a_setting(
    watched: Callable[..., FlaskClient], model: ChatCompletionsServer, logs: RecordHandler
) -> None:
    announce(model, 80)
    wait_for_probe(watched(openai_shutdown_warn_days=90), "reachable")
    assert len(shutdown_lines(logs, "WARNING")) == 1


def test_the_warning_is_repeated_once_a_day(
    watched: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    logs: RecordHandler,
    day: MovableDay,
    clock: MovableClock,
) -> None:
    announce(model, 30)
    client = watched()
    probe_times(client, model, clock, 3)
    assert len(shutdown_lines(logs, "WARNING")) == 1
    day.advance(1)
    probe_times(client, model, clock, len(model.probes) + 2)
    (_, next_day) = shutdown_lines(logs, "WARNING")
    assert "29 days" in next_day


def test_no_shutdown_announced_says_so(
    watched: Callable[..., FlaskClient], model: ChatCompletionsServer, logs: RecordHandler
) -> None:
    model.model_fields = {"shutdown_date": None}
    body = wait_for_probe(watched(), "reachable")
    assert body["checks"]["openai_model_shutdown"] == "none announced"
    assert shutdown_lines(logs, "WARNING") == shutdown_lines(logs, "ERROR") == []


@pytest.mark.parametrize(
    ("fields", "status", "verdict"),
    [
        ({}, 200, "reachable"),
        ({"shutdown_date": "2027-1-2"}, 200, "reachable"),
        ({"shutdown_date": "14 January 2027"}, 200, "reachable"),
        ({"shutdown_date": "2027-02-30"}, 200, "reachable"),
        ({"shutdown_date": "\uff12\uff10\uff12\uff17-01-14"}, 200, "reachable"),
        ({"shutdown_date": 20270114}, 200, "reachable"),
        ({"shutdown_date": "2027-01-14"}, 404, "model not found"),
    ],
    ids=["absent", "short", "words", "no-such-day", "wide-digits", "number", "not-found"],
)
def test_a_server_that_does_not_say_leaves_the_shutdown_unknown(
    watched: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    logs: RecordHandler,
    fields: dict[str, Any],
    status: int,
    verdict: str,
) -> None:
    model.model_fields = fields
    model.model_status = status
    body = wait_for_probe(watched(), verdict)
    assert body["checks"]["openai_probe"] == verdict
    assert body["checks"]["openai_model_shutdown"] == "unknown"
    assert shutdown_lines(logs, "WARNING") == shutdown_lines(logs, "ERROR") == []


def test_the_shutdown_is_unknown_before_the_first_probe_answers(
    watched: Callable[..., FlaskClient],
) -> None:
    with StalledServer() as stalled:
        client = watched(openai_base_url=stalled.http_url + "/v1")
        assert client.get("/health").get_json()["checks"]["openai_model_shutdown"] == "unknown"


def test_the_days_left_are_a_gauge(
    watched: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    announce(model, 30)
    client = watched(openai_model="gpt-6-sol")
    wait_for_probe(client, "reachable")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'image_service_model_shutdown_days{model="gpt-6-sol"} 30.0' in text
