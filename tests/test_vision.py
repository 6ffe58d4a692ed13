"""The vision model call: the request it gets, retries, and what its answers become."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

import pytest
from flask.testing import FlaskClient
from PIL import Image
from requests.structures import CaseInsensitiveDict
from werkzeug.test import TestResponse

from app import (
    AnalysisRequest,
    Config,
    NotFood,
    UpstreamError,
    build_model_request,
)
from meal import (
    MAX_CALORIES,
    MAX_GRAMS,
    MAX_INGREDIENTS,
    MAX_ITEM_GRAMS,
    MAX_NAME_LENGTH,
    MAX_TEXT_READ,
    beyond_limits,
    clean_text,
    normalise_analysis,
    parse_number,
)
from model_servers import retry_after_seconds
from prompt import parse_model_content
from tests import images
from tests.conftest import MEAL, AnalyzeActions, cached_keys
from tests.fakes import (
    DEFAULT_ANALYSIS,
    ChatCompletionsServer,
    RedisServer,
    Reply,
    UserServiceServer,
    answer_with,
    free_port,
)

if TYPE_CHECKING:
    from tests.conftest import RecordHandler

CONTRACT_FIELDS = {
    "name",
    "calories",
    "protein",
    "carbs",
    "fat",
    "servingSize",
    "ingredients",
    "confidence",
}
completion = ChatCompletionsServer.completion
model_error = ChatCompletionsServer.error


def delayed(reply: Reply, seconds: float = 1.0) -> Reply:
    """The same reply, sent only after a delay."""
    return dataclasses.replace(reply, delay=seconds)


def assert_upstream_error(response: TestResponse, status: int = 502) -> None:
    """The contract's JSON error for a failed model call."""
    assert response.status_code == status
    assert response.mimetype == "application/json"
    code = "upstream_timeout" if status == 504 else "upstream_error"
    assert response.get_json()["code"] == code


# ------------------------------------------------------------------ the request the model gets


def test_model_receives_a_post_to_chat_completions(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    api.analyze()
    [call] = model.calls
    assert (call.method, call.route) == ("POST", "/v1/chat/completions")


def test_model_request_carries_the_api_key_as_bearer(
    api: AnalyzeActions, model: ChatCompletionsServer, config: Config
) -> None:
    api.analyze()
    assert model.calls[0].header("authorization") == f"Bearer {config.openai_api_key}"


def test_model_request_names_the_configured_model(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    api.analyze(client=client_with(openai_model="gpt-4o-mini"))
    assert model.last_payload()["model"] == "gpt-4o-mini"


def test_model_request_has_instructions_then_a_user_message_with_text_and_image(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    api.analyze()
    system, user = model.last_payload()["messages"]
    assert system["role"] == "system"
    assert isinstance(system["content"], str)
    assert system["content"].strip()
    assert user["role"] == "user"
    assert [part["type"] for part in user["content"]] == ["text", "image_url"]
    assert user["content"][0]["text"].strip()


def test_model_request_image_is_a_base64_jpeg_data_url(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    api.analyze(images.png(80, 60))
    with Image.open(io.BytesIO(model.last_image_bytes())) as sent:
        assert sent.format == "JPEG"
        assert sent.size == (80, 60)


def test_model_request_image_detail_defaults_to_auto(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    api.analyze()
    assert model.last_image_detail() == "auto"


def test_model_request_image_detail_follows_config(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    api.analyze(client=client_with(openai_image_detail="low"))
    assert model.last_image_detail() == "low"


def test_model_request_asks_for_strict_json_schema_output(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    api.analyze()
    response_format = model.last_payload()["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["strict"] is True
    assert response_format["json_schema"]["name"]


def test_model_request_schema_requires_every_property_and_forbids_others(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    api.analyze()
    schema = model.last_payload()["response_format"]["json_schema"]["schema"]
    assert schema["type"] == "object"
    assert set(schema["properties"]) >= CONTRACT_FIELDS - {"calories", "protein", "carbs", "fat"}
    item = schema["properties"]["items"]["items"]
    assert set(item["properties"]) >= {"name", "grams", "calories", "protein", "carbs", "fat"}
    for strict in (schema, item, schema["properties"]["caloriesRange"]):
        assert sorted(strict["required"]) == sorted(strict["properties"])
        assert strict["additionalProperties"] is False


def test_model_request_caps_output_tokens(
    api: AnalyzeActions, model: ChatCompletionsServer, config: Config
) -> None:
    api.analyze()
    assert model.last_payload()["max_completion_tokens"] == config.openai_max_output_tokens > 0


def test_build_model_request_embeds_the_given_jpeg(config: Config) -> None:
    body = build_model_request([MEAL], config, AnalysisRequest())
    image_part = body["messages"][1]["content"][-1]["image_url"]
    prefix = "data:image/jpeg;base64,"
    assert image_part["url"].startswith(prefix)
    assert base64.b64decode(image_part["url"][len(prefix) :]) == MEAL
    assert image_part["detail"] == config.openai_image_detail


# ------------------------------------------------------------------ retries


def test_rate_limit_is_retried_and_succeeds(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(model_error(429, "Rate limit reached", code="rate_limit_exceeded"))
    response = api.analyze()
    assert response.status_code == 200
    assert len(model.calls) == 2


def test_rate_limit_retry_waits_the_requested_retry_after_ms(
    api: AnalyzeActions,
    client_with: Callable[..., FlaskClient],
    model: ChatCompletionsServer,
    logs: RecordHandler,
) -> None:
    model.enqueue(
        model_error(429, "Rate limit reached", headers={"retry-after-ms": "200"}),
    )
    response = api.analyze(client=client_with(openai_retry_after_cap=60.0))
    assert response.status_code == 200
    assert len(model.calls) == 2
    # The wait the retry was given, as the service logs it before sleeping, not a stopwatch's.
    assert "Retrying the vision model (attempt 1 failed; waiting 0.20s)" in logs.text()


def test_retry_after_beyond_the_cap_answers_503_at_once_with_the_servers_wait(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    model.enqueue(model_error(429, "Rate limit reached", headers={"Retry-After": "3600"}))
    response = api.analyze(client=client_with(openai_retry_after_cap=0.05))
    assert response.status_code == 503
    assert response.get_json()["code"] == "upstream_rate_limited"
    assert response.headers["Retry-After"] == "3600"
    assert len(model.calls) == 1


def test_server_error_on_every_attempt_answers_502_after_max_attempts(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(*[model_error(500)] * 5)
    response = api.analyze()
    assert_upstream_error(response)
    assert len(model.calls) == 3


def test_max_attempts_follows_config(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    model.enqueue(*[model_error(500)] * 5)
    response = api.analyze(client=client_with(openai_max_attempts=2))
    assert_upstream_error(response)
    assert len(model.calls) == 2


def test_service_unavailable_then_success_answers_200(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(model_error(503, "The engine is currently overloaded"))
    response = api.analyze()
    assert response.status_code == 200
    assert len(model.calls) == 2


@pytest.mark.parametrize("status", [408, 409])
def test_request_timeout_and_conflict_are_retried(
    api: AnalyzeActions, model: ChatCompletionsServer, status: int
) -> None:
    model.enqueue(model_error(status, "Please retry"))
    response = api.analyze()
    assert response.status_code == 200
    assert len(model.calls) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_client_errors_are_not_retried(
    api: AnalyzeActions, model: ChatCompletionsServer, status: int
) -> None:
    model.enqueue(model_error(status, "Rejected"))
    response = api.analyze()
    assert_upstream_error(response)
    assert len(model.calls) == 1


def test_insufficient_quota_is_not_retried(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(
        model_error(429, "You exceeded your current quota", code="insufficient_quota"),
        model_error(429, "You exceeded your current quota", code="insufficient_quota"),
    )
    response = api.analyze()
    assert_upstream_error(response)
    assert len(model.calls) == 1


def test_unreachable_model_answers_502_upstream_error(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient]
) -> None:
    client = client_with(openai_base_url=f"http://127.0.0.1:{free_port()}/v1")
    assert_upstream_error(api.analyze(client=client))


def test_model_stalling_on_every_attempt_answers_504_upstream_timeout(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    model.enqueue(delayed(answer_with()), delayed(answer_with()))
    client = client_with(openai_api_timeout=0.3, openai_max_attempts=2)
    assert_upstream_error(api.analyze(client=client), status=504)
    assert len(model.calls) == 2


def test_model_stall_then_answer_succeeds(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    model.enqueue(delayed(answer_with()))
    response = api.analyze(client=client_with(openai_api_timeout=0.3))
    assert response.status_code == 200
    assert len(model.calls) == 2


def test_dropped_connection_is_retried(api: AnalyzeActions, model: ChatCompletionsServer) -> None:
    model.enqueue(Reply(drop=True))
    response = api.analyze()
    assert response.status_code == 200
    assert len(model.calls) == 2


# ------------------------------------------------------------------ answers the service accepts


def test_answer_in_a_markdown_json_fence_is_accepted(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(completion(f"```json\n{json.dumps(DEFAULT_ANALYSIS)}\n```"))
    response = api.analyze()
    assert response.status_code == 200
    assert response.get_json()["analysis"]["name"] == DEFAULT_ANALYSIS["name"]


def test_numbers_given_as_strings_are_parsed(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(answer_with(calories="450 kcal", protein="40 g", carbs="10.5g", fat="25"))
    analysis = api.analyze().get_json()["analysis"]
    assert (analysis["calories"], analysis["protein"], analysis["carbs"], analysis["fat"]) == (
        450,
        40,
        10.5,
        25,
    )


def test_an_items_numbers_given_as_strings_in_their_units_are_parsed(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    food = {"name": "rice", "grams": "180 g", "calories": "234kcal", "protein": "4.3 g"}
    model.enqueue(answer_with(items=[{**food, "carbs": "51.5", "fat": ".5", "confidence": "80%"}]))
    [counted] = api.analyze().get_json()["analysis"]["items"]
    assert counted == {
        **food,
        "grams": 180,
        "calories": 234,
        "protein": 4.3,
        "carbs": 51.5,
        "fat": 0.5,
        "confidence": 0.8,
        "photos": [1],
    }


def test_calories_are_a_whole_number(api: AnalyzeActions, model: ChatCompletionsServer) -> None:
    model.enqueue(answer_with(calories=450.7))
    calories = api.analyze().get_json()["analysis"]["calories"]
    assert calories == 451
    assert isinstance(calories, int)


def test_grams_keep_at_most_one_decimal(api: AnalyzeActions, model: ChatCompletionsServer) -> None:
    model.enqueue(answer_with(protein=40.26, carbs=9.94, fat=25.0))
    analysis = api.analyze().get_json()["analysis"]
    assert (analysis["protein"], analysis["carbs"], analysis["fat"]) == (40.3, 9.9, 25)


@pytest.mark.parametrize(("given", "expected"), [(92, 0.92), ("92%", 0.92), (0.5, 0.5)])
def test_confidence_percentage_is_read_as_a_fraction(
    api: AnalyzeActions, model: ChatCompletionsServer, given: Any, expected: float
) -> None:
    model.enqueue(answer_with(confidence=given))
    assert api.analyze().get_json()["analysis"]["confidence"] == expected


def test_confidence_above_a_hundred_percent_is_clamped_to_one(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(answer_with(confidence=150))
    assert api.analyze().get_json()["analysis"]["confidence"] == 1.0


def test_fractional_confidence_above_one_is_clamped_not_read_as_percent(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(answer_with(confidence=1.7))
    assert api.analyze().get_json()["analysis"]["confidence"] == 1.0


def test_negative_confidence_is_clamped_to_zero(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(answer_with(confidence=-0.3))
    assert api.analyze().get_json()["analysis"]["confidence"] == 0.0


LONG_TEXT = "word " * 10_000


def test_every_string_from_the_model_is_cut_to_its_cap(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    food = {
        "name": LONG_TEXT,
        "grams": 100,
        "calories": 100,
        "protein": 5,
        "carbs": 10,
        "fat": 4,
        "confidence": 0.8,
        "description": LONG_TEXT,
        "cookingMethod": LONG_TEXT,
    }
    texts = {"name": LONG_TEXT, "servingSize": LONG_TEXT, "ingredients": [LONG_TEXT]}
    listed = {"assumptions": [LONG_TEXT], "suggestions": [LONG_TEXT], "items": [food]}
    model.enqueue(answer_with(**texts, **listed))
    analysis = api.analyze().get_json()["analysis"]
    [counted] = analysis["items"]
    strings = [analysis["name"], analysis["servingSize"], *analysis["ingredients"]]
    strings += [*analysis["assumptions"], *analysis["suggestions"]]
    strings += [counted["name"], counted["description"], counted["cookingMethod"]]
    assert len(strings) == 8
    assert all(0 < len(text) <= MAX_NAME_LENGTH for text in strings)


# ------------------------------------------------------------------ answers the service refuses

UNUSABLE_ANSWERS = {
    "negative calories": answer_with(calories=-100),
    "absurd calories": answer_with(calories=50_000),
    "absurd grams": answer_with(fat=5_000),
    "calories not a number": answer_with(calories="lots"),
    "calories in exponent notation": answer_with(calories="1e3"),
    "calories of 1e308 as text": answer_with(calories="1e308"),
    "calories with a thousands separator": answer_with(calories="1,200"),
    "protein in kilograms": answer_with(protein="2.5kg"),
    "protein in calories": answer_with(protein="40 kcal"),
    "calories in grams": answer_with(calories="450 g"),
    "fat with a decimal comma": answer_with(fat="1,5"),
    "carbs with a unicode minus": answer_with(carbs="\u22125"),
    "calories in hexadecimal": answer_with(calories="0x10"),
    "protein in arabic-indic digits": answer_with(protein="\u0661\u0662"),
    "protein in fullwidth digits": answer_with(protein="\uff14\uff10"),
    "fat with words around it": answer_with(fat="about 25 g"),
    "calories as infinity": answer_with(calories="Infinity"),
    "calories with an underscore": answer_with(calories="1_000"),
    "confidence in exponent notation": answer_with(confidence="9e-1"),
    "item grams in kilograms": answer_with(
        items=[
            {
                "name": "rice",
                "grams": "2.5kg",
                "calories": 234,
                "protein": 4,
                "carbs": 51,
                "fat": 0,
                "confidence": 0.8,
            }
        ]
    ),
    "calorie range in exponent notation": answer_with(caloriesRange={"low": "4e2", "high": 500}),
    "missing field": answer_with(protein=None),
    "empty name": answer_with(name=""),
    "prose": completion("This looks like grilled salmon with about 450 kcal."),
    "json array": completion(json.dumps([DEFAULT_ANALYSIS])),
    "refusal": completion(None, refusal="I can't help with that."),
    "empty content": completion(""),
    "null content": completion(None),
    "http body not json": Reply(200, "<html>upstream proxy error</html>"),
    "http body without choices": Reply(200, {"object": "chat.completion", "choices": []}),
}


@pytest.mark.parametrize("reply", UNUSABLE_ANSWERS.values(), ids=UNUSABLE_ANSWERS.keys())
def test_unusable_answer_answers_502_upstream_error(
    api: AnalyzeActions, model: ChatCompletionsServer, reply: Reply
) -> None:
    model.enqueue(reply)
    assert_upstream_error(api.analyze())


@pytest.mark.parametrize("reply", UNUSABLE_ANSWERS.values(), ids=UNUSABLE_ANSWERS.keys())
def test_unusable_answer_is_not_retried(
    api: AnalyzeActions, model: ChatCompletionsServer, reply: Reply
) -> None:
    model.enqueue(reply)
    api.analyze()
    assert len(model.calls) == 1


FAILURES = {
    **UNUSABLE_ANSWERS,
    "server error": model_error(500),
    "bad request": model_error(400, "Invalid image"),
}


@pytest.mark.parametrize("reply", FAILURES.values(), ids=FAILURES.keys())
def test_failed_analysis_is_not_cached(
    api: AnalyzeActions, model: ChatCompletionsServer, redis: RedisServer, reply: Reply
) -> None:
    model.enqueue(*[reply] * 3)
    assert api.analyze().status_code != 200
    assert cached_keys(redis) == []
    model.reset()
    again = api.analyze()
    assert again.get_json()["source"] == "api"
    assert len(model.calls) == 1


def test_not_food_answers_422_not_food(api: AnalyzeActions, model: ChatCompletionsServer) -> None:
    model.analysis = {**DEFAULT_ANALYSIS, "isFood": False, "name": "", "calories": 0}
    response = api.analyze()
    assert response.status_code == 422
    assert response.get_json()["code"] == "not_food"


def test_not_food_saves_nothing(
    api: AnalyzeActions, model: ChatCompletionsServer, user_service: UserServiceServer
) -> None:
    model.analysis = {**DEFAULT_ANALYSIS, "isFood": False, "name": "", "calories": 0}
    api.analyze(save=True)
    assert user_service.calls == []
    assert user_service.entries == []


# ------------------------------------------------------------------ configuration and secrets


def test_missing_api_key_answers_503_without_calling_the_model(
    api: AnalyzeActions, client_with: Callable[..., FlaskClient], model: ChatCompletionsServer
) -> None:
    response = api.analyze(client=client_with(openai_api_key=None))
    assert response.status_code == 503
    assert response.get_json()["code"] == "ai_not_configured"
    assert model.calls == []


def leaky_replies(key: str) -> dict[str, Reply]:
    """Failures whose upstream text repeats the API key, as OpenAI's own 401 message does."""
    return {
        "401 echoing the key": model_error(401, f"Incorrect API key provided: {key}."),
        "400 echoing the key": model_error(400, f"Bad request from {key}"),
        "500 echoing the key": model_error(500, f"Internal error for {key}"),
        "body not json": Reply(200, f"proxy says hello to {key}"),
        "prose content": completion(f"I see salmon. Your key is {key}"),
        "refusal": completion(None, refusal=f"I refuse, {key}"),
    }


@pytest.mark.parametrize("scenario", list(leaky_replies("any-key")))
def test_api_key_never_appears_in_a_response_or_log_line(
    api: AnalyzeActions,
    model: ChatCompletionsServer,
    config: Config,
    logs: RecordHandler,
    scenario: str,
) -> None:
    key = str(config.openai_api_key)
    model.enqueue(*[leaky_replies(key)[scenario]] * 3)
    response = api.analyze()
    assert response.status_code == 502
    assert key not in response.get_data(as_text=True)
    assert key not in str(response.headers)
    assert key not in logs.text()


def test_api_key_never_appears_when_the_model_is_unreachable(
    api: AnalyzeActions,
    client_with: Callable[..., FlaskClient],
    config: Config,
    logs: RecordHandler,
) -> None:
    key = str(config.openai_api_key)
    response = api.analyze(client=client_with(openai_base_url=f"http://127.0.0.1:{free_port()}/v1"))
    assert key not in response.get_data(as_text=True)
    assert key not in logs.text()


# ------------------------------------------------------------------ log lines


def test_failed_model_request_logs_openai_request_failed(
    api: AnalyzeActions, model: ChatCompletionsServer, logs: RecordHandler
) -> None:
    model.enqueue(*[model_error(500)] * 3)
    api.analyze()
    assert "OpenAI API request failed" in logs.text()


@pytest.mark.parametrize(
    "reply",
    [model_error(400, "Invalid image"), completion("not json at all")],
    ids=["http error", "unusable answer"],
)
def test_failed_analysis_logs_error_analyzing_food_image(
    api: AnalyzeActions, model: ChatCompletionsServer, logs: RecordHandler, reply: Reply
) -> None:
    model.enqueue(reply)
    api.analyze()
    assert "Error analyzing food image" in logs.text()


# ------------------------------------------------------------------ pure parts


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (450, 450.0),
        (12.5, 12.5),
        ("450", 450.0),
        (" 12.5 ", 12.5),
        (".5", 0.5),
        ("-3", -3.0),
        ("0012", 12.0),
        ("5.", 5.0),
    ],
)
def test_parse_number_reads_numbers_and_plain_decimal_strings(value: Any, expected: float) -> None:
    assert parse_number(value) == expected


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("450 kcal", "kcal", 450.0),
        ("450kcal", "kcal", 450.0),
        ("450 KCAL", "kcal", 450.0),
        ("40 g", "g", 40.0),
        ("12.5g", "g", 12.5),
        ("92%", "%", 92.0),
        ("12.5", "g", 12.5),
        (12.5, "g", 12.5),
    ],
)
def test_parse_number_reads_a_decimal_string_in_its_own_unit(
    value: Any, unit: str, expected: float
) -> None:
    assert parse_number(value, unit) == expected


@pytest.mark.parametrize(
    "value",
    [
        "lots",
        "",
        " ",
        None,
        True,
        [450],
        float("nan"),
        float("inf"),
        pytest.param(10**400, id="an int beyond a float"),
        "1e3",
        "1E3",
        "1e308",
        "1,5",
        "1,200",
        "1.200,5",
        "\u22125",
        "+5",
        "--5",
        "0x10",
        "0b101",
        "1_000",
        "\u0661\u0662",
        "\uff15",
        "\u00b2",
        "inf",
        "nan",
        "Infinity",
        "about 12.5",
        "12.5 or so",
        "1.2.3",
        "-",
        ".",
        "12 5",
        "1" * 400,
    ],
)
def test_parse_number_refuses_what_is_not_a_plain_finite_decimal(value: Any) -> None:
    assert parse_number(value) is None
    assert parse_number(value, "g") is None


@pytest.mark.parametrize(
    ("value", "unit"),
    [
        ("2.5kg", "g"),
        ("2.5 mg", "g"),
        ("450 kcal", "g"),
        ("40 g", "kcal"),
        ("92%", "g"),
        ("450 cal", "kcal"),
        ("40 grams", "g"),
        ("40 g g", "g"),
        ("40 g", ""),
    ],
)
def test_parse_number_refuses_a_unit_not_the_fields_own(value: str, unit: str) -> None:
    assert parse_number(value, unit) is None


@pytest.mark.parametrize(
    "content",
    [
        '{"name": "soup"}',
        '  {"name": "soup"}\n',
        '```json\n{"name": "soup"}\n```',
        '```\n{"name": "soup"}\n```',
        '```JSON {"name": "soup"} ```',
    ],
)
def test_parse_model_content_accepts_plain_or_fenced_json(content: str) -> None:
    assert parse_model_content(content) == {"name": "soup"}


@pytest.mark.parametrize(
    "content", ["It is soup.", '["soup"]', '"soup"', "42", "```json\nnot json\n```"]
)
def test_parse_model_content_refuses_anything_but_a_json_object(content: str) -> None:
    with pytest.raises(UpstreamError):
        parse_model_content(content)


def test_normalise_analysis_keeps_only_the_fields_it_knows() -> None:
    raw = {**DEFAULT_ANALYSIS, "isFood": True, "notes": "extra", "entryId": "forged"}
    assert set(normalise_analysis(raw)) == CONTRACT_FIELDS | {
        "items",
        "assumptions",
        "suggestions",
        "warnings",
    }


def test_normalise_analysis_refuses_a_photo_without_food() -> None:
    with pytest.raises(NotFood):
        normalise_analysis({**DEFAULT_ANALYSIS, "isFood": False})


@pytest.mark.parametrize(
    "changes",
    [{"calories": -1}, {"calories": 50_000}, {"protein": -2}, {"carbs": "many"}, {"name": ""}],
    ids=["negative calories", "absurd calories", "negative protein", "carbs text", "no name"],
)
def test_normalise_analysis_refuses_unbelievable_values(changes: dict[str, Any]) -> None:
    with pytest.raises(UpstreamError):
        normalise_analysis({**DEFAULT_ANALYSIS, **changes})


@pytest.mark.parametrize("missing", sorted(CONTRACT_FIELDS))
def test_normalise_analysis_refuses_a_missing_field(missing: str) -> None:
    raw = {name: value for name, value in DEFAULT_ANALYSIS.items() if name != missing}
    with pytest.raises(UpstreamError):
        normalise_analysis(raw)


def test_normalise_analysis_turns_comma_separated_ingredients_into_a_list() -> None:
    analysis = normalise_analysis({**DEFAULT_ANALYSIS, "ingredients": "salmon, asparagus"})
    assert analysis["ingredients"] == ["salmon", "asparagus"]


def test_normalise_analysis_drops_non_text_and_repeated_ingredients() -> None:
    raw = {**DEFAULT_ANALYSIS, "ingredients": ["salmon", 7, "Salmon", "", "  lemon  "]}
    assert normalise_analysis(raw)["ingredients"] == ["salmon", "lemon"]


def test_normalise_analysis_keeps_the_first_distinct_ingredients() -> None:
    names = [f"food {number}" for number in range(MAX_INGREDIENTS * 3)]
    raw = {**DEFAULT_ANALYSIS, "ingredients": ["salmon", "SALMON", *names]}
    assert normalise_analysis(raw)["ingredients"] == ["salmon", *names[: MAX_INGREDIENTS - 1]]


def test_text_from_the_model_is_read_no_further_than_its_bound() -> None:
    late = " " * MAX_TEXT_READ + "late words"
    raw = {**DEFAULT_ANALYSIS, "name": "soup", "servingSize": late, "assumptions": [late]}
    analysis = normalise_analysis({**raw, "ingredients": [late], "suggestions": [late]})
    assert analysis["servingSize"] == ""
    assert (analysis["ingredients"], analysis["assumptions"], analysis["suggestions"]) == (
        [],
        [],
        [],
    )
    assert clean_text(late, MAX_NAME_LENGTH) == ""


def final_answer(**changes: Any) -> dict[str, Any]:
    """A believable final answer of two items, with some of its numbers changed."""
    food = {"name": "rice", "grams": 180, "calories": 234, "protein": 4, "carbs": 51, "fat": 1}
    analysis: dict[str, Any] = {
        **normalise_analysis({**DEFAULT_ANALYSIS, "items": [{**food, "confidence": 1}] * 2}),
        "caloriesRange": {"low": 400, "high": 600},
    }
    for path, value in changes.items():
        *parents, name = path.split("__")
        holder = analysis
        for parent in parents:
            holder = holder[int(parent)] if parent.isdigit() else holder[parent]
        holder[name] = value
    return analysis


def test_a_believable_final_answer_is_within_the_limits() -> None:
    assert beyond_limits(final_answer()) == []


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"calories": MAX_CALORIES + 1}, "calories"),
        ({"protein": MAX_GRAMS + 0.1}, "protein"),
        ({"carbs": MAX_GRAMS * 2}, "carbs"),
        ({"fat": -1}, "fat"),
        ({"items__1__grams": MAX_ITEM_GRAMS + 1}, "item 2's grams"),
        ({"items__0__calories": MAX_CALORIES + 1}, "item 1's calories"),
        ({"items__0__fat": MAX_GRAMS + 1}, "item 1's fat"),
        ({"items__1__protein": -0.5}, "item 2's protein"),
        ({"caloriesRange__high": MAX_CALORIES + 1}, "calorie range"),
        ({"calories": "450"}, "calories"),
        ({"items__0__carbs": None}, "item 1's carbs"),
        ({"fat": float("nan")}, "fat"),
        ({"protein": True}, "protein"),
    ],
)
def test_beyond_limits_names_each_number_past_a_meals_limits(
    changes: dict[str, Any], named: str
) -> None:
    [problem] = beyond_limits(final_answer(**changes))
    assert named in problem


def test_beyond_limits_names_every_number_past_them() -> None:
    analysis = final_answer(calories=MAX_CALORIES * 2, items__0__fat=MAX_GRAMS * 2)
    assert len(beyond_limits(analysis)) == 2


def response_with(headers: dict[str, str]) -> CaseInsensitiveDict[str]:
    """An answer's headers, as requests reads them (any case)."""
    return CaseInsensitiveDict(headers)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "250", "Retry-After": "3"}, 0.25),
        ({"retry-after-ms": "soon", "Retry-After": "3"}, 3.0),
        ({"Retry-After": "-5"}, 0.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        ({"Retry-After": "whenever"}, None),
        ({}, None),
    ],
)
def test_retry_after_seconds_reads_the_wait_the_server_asked_for(
    headers: dict[str, str], expected: float | None
) -> None:
    assert retry_after_seconds(response_with(headers)) == expected


def test_retry_after_seconds_reads_a_future_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    wait = retry_after_seconds(response_with({"Retry-After": when}))
    assert wait is not None
    assert 20 < wait <= 30
