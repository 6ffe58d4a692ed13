"""model_servers.py by itself: error shapes, waits, the fields sent, the endpoint, the shutdown."""

from __future__ import annotations

import re
from datetime import date, timedelta
from typing import Any

import pytest
import requests

from errors import TransientUpstreamError, UpstreamError, UpstreamTimeout
from model_servers import (
    NO_SHUTDOWN_ANNOUNCED,
    SHUTDOWN_UNKNOWN,
    LearntProfile,
    ModelEndpoint,
    RequestFields,
    ServerProfile,
    ShutdownWatch,
    UpstreamProblem,
    as_chat_completion,
    as_responses_body,
    connection_failure,
    duration_seconds,
    finish_reason,
    probe_verdict,
    rate_limit_reset_seconds,
    reasoning_family,
    rejected_field,
    shutdown_in,
    token_usage,
    upstream_problem,
)
from outbound_http import AnswerTooLarge, UpstreamReply
from tests.fakes import ResponsesServer

# ------------------------------------------------------------------ error shapes


@pytest.mark.parametrize(
    ("payload", "raw", "expected"),
    [
        (
            {"error": {"message": "bad", "code": "invalid_value", "param": "max_tokens"}},
            b"",
            UpstreamProblem("bad", code="invalid_value", param="max_tokens"),
        ),
        (
            {"object": "error", "message": "no", "type": "BadRequestError", "code": 400},
            b"",
            UpstreamProblem("no", code="BadRequestError", status=400),
        ),
        (
            [{"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}}],
            b"",
            UpstreamProblem("slow down", code="RESOURCE_EXHAUSTED", status=429),
        ),
        ({"error": "Model not loaded"}, b"", UpstreamProblem("Model not loaded")),
        (None, b"  Bad Gateway\n", UpstreamProblem("Bad Gateway")),
        (None, b"", None),
        ({"choices": []}, b"", None),
    ],
)
def test_upstream_problem_reads_each_vendors_shape(
    payload: object, raw: bytes, expected: UpstreamProblem | None
) -> None:
    assert upstream_problem(payload, raw) == expected


def test_a_validation_list_reads_as_field_and_complaint() -> None:
    payload = {
        "object": "error",
        "message": {"detail": [{"loc": ["body", "max_completion_tokens"], "msg": "extra"}]},
    }
    problem = upstream_problem(payload, b"")
    assert problem is not None
    assert problem.message == "body.max_completion_tokens: extra"


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        (UpstreamProblem("whatever", param="temperature"), "temperature"),
        (UpstreamProblem("'max_tokens' is not supported with this model"), "max_tokens"),
        (UpstreamProblem("body.max_completion_tokens: extra"), "max_completion_tokens"),
        (UpstreamProblem("my_max_tokens is odd"), None),
        (UpstreamProblem("reasoning_effort unsupported", param="top_p"), "reasoning_effort"),
    ],
)
def test_rejected_field_names_only_a_field_that_was_sent(
    problem: UpstreamProblem, expected: str | None
) -> None:
    body = {"max_tokens": 1, "max_completion_tokens": 1, "temperature": 0, "reasoning_effort": "x"}
    assert rejected_field(problem, body) == expected


def test_rejected_field_ignores_a_field_not_sent() -> None:
    assert rejected_field(UpstreamProblem("temperature is fixed"), {"max_tokens": 1}) is None


# ------------------------------------------------------------------ waits


@pytest.mark.parametrize(
    ("text", "expected"),
    [("6m0s", 360.0), ("1h2m3.5s", 3723.5), ("20ms", 0.02), ("7", 7.0), ("-1", None), ("x", None)],
)
def test_duration_seconds_reads_go_durations_and_numbers(text: str, expected: float | None) -> None:
    assert duration_seconds(text) == expected


def test_a_rate_limit_reset_counts_only_an_exhausted_limit() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "1m",
    }
    assert rate_limit_reset_seconds(headers) == 2.0
    assert rate_limit_reset_seconds({**headers, "x-ratelimit-remaining-requests": "3"}) is None


# ------------------------------------------------------------------ what a completion reports


def test_finish_reason_and_token_usage_read_a_completion() -> None:
    payload = {
        "choices": [{"finish_reason": "length"}],
        "usage": {
            "prompt_tokens": 900,
            "completion_tokens": 1500,
            "total_tokens": True,
            "completion_tokens_details": {"reasoning_tokens": 1400},
            "prompt_tokens_details": {"cached_tokens": -1},
        },
    }
    assert finish_reason(payload) == "length"
    assert token_usage(payload) == {
        "prompt_tokens": 900,
        "completion_tokens": 1500,
        "reasoning_tokens": 1400,
    }
    assert finish_reason({"choices": []}) is None
    assert token_usage({"usage": "many"}) == {}


# ------------------------------------------------------------------ what a server takes


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-6-luna", True),
        ("openai/gpt-5-mini", True),
        ("gpt-5-chat-latest", False),
        ("o4-mini", True),
        ("gpt-4.1-mini", False),
        ("llava", False),
    ],
)
def test_reasoning_family_reads_the_last_path_segment(model: str, expected: bool) -> None:
    assert reasoning_family(model) is expected


def test_a_refused_cap_field_is_renamed_and_a_refused_temperature_left_out() -> None:
    plain = ServerProfile()
    renamed = plain.without("max_tokens")
    assert renamed == ServerProfile("max_completion_tokens", reasoning=True)
    assert plain.without("temperature") == ServerProfile(temperature=False)
    assert ServerProfile(temperature=False).without("temperature") is None
    assert plain.without("top_p") is None


def test_a_stored_profile_reads_back_and_a_damaged_one_does_not() -> None:
    profile = ServerProfile("max_completion_tokens", temperature=False, reasoning=True)
    assert ServerProfile.from_json(profile.to_json()) == profile
    assert ServerProfile.from_json('{"cap_field": "n"}') is None
    assert ServerProfile.from_json("[") is None
    assert ServerProfile.from_json(None) is None


class StoreDown(Exception):
    """What the test's store raises once it is down."""


class DictStore:
    """A store in a dict that can be told to fail."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.down = False

    def get(self, key: str) -> str | None:
        """The value under key; StoreDown while down."""
        if self.down:
            raise StoreDown
        return self.values.get(key)

    def set(self, key: str, value: str, ttl: float) -> None:
        """Keep the value; StoreDown while down."""
        if self.down:
            raise StoreDown
        self.values[key] = value


def test_a_learnt_profile_is_shared_through_the_store() -> None:
    store = DictStore()
    one = LearntProfile(store, "http://server/v1", "llava", "none", StoreDown)
    other = LearntProfile(store, "http://server/v1", "llava", "none", StoreDown)
    elsewhere = LearntProfile(store, "http://server/v1", "llava", "low", StoreDown)
    assert one.current() == ServerProfile()
    learnt = one.learn(ServerProfile(temperature=False), "refused temperature")
    assert other.current() == learnt
    assert elsewhere.current() == ServerProfile()


def test_a_failing_store_leaves_the_process_with_what_it_learnt() -> None:
    store = DictStore()
    learnt = LearntProfile(store, "http://server/v1", "gpt-6-luna", "none", StoreDown)
    assert learnt.current() == ServerProfile.assumed("gpt-6-luna", "none")
    store.down = True
    kept = learnt.learn(ServerProfile(temperature=False), "refused temperature")
    assert learnt.current() == kept


# ------------------------------------------------------------------ what is sent


def test_the_effort_none_goes_only_to_a_model_that_reasons() -> None:
    fields = RequestFields("llava", "none", 1000, 16000, 128_000, {"seed": 7})
    plain = ServerProfile()
    assert fields.body({"model": "llava"}, plain, 1000) == {
        "model": "llava",
        "max_tokens": 1000,
        "temperature": 0,
        "seed": 7,
    }
    reasoning = ServerProfile("max_completion_tokens", temperature=False, reasoning=True)
    assert fields.body({}, reasoning, 1000)["reasoning_effort"] == "none"


def test_a_reasoning_model_gets_the_reasoning_cap_and_once_a_larger_one() -> None:
    fields = RequestFields("gpt-6-luna", "high", 1000, 16000, 128_000, {})
    profile = ServerProfile.assumed("gpt-6-luna", "high")
    assert fields.output_cap(profile) == 16000
    assert fields.larger_cap(profile, 16000, {"reasoning_tokens": 16000}) == 32000
    assert fields.larger_cap(profile, 16000, {}) is None
    assert fields.larger_cap(profile, 128_000, {"reasoning_tokens": 1}) is None
    told_none = RequestFields("gpt-6-luna", "none", 1000, 16000, 128_000, {})
    assert told_none.output_cap(ServerProfile.assumed("gpt-6-luna", "none")) == 1000


def test_a_field_refused_again_leaves_nothing_to_try() -> None:
    fields = RequestFields("llava", "none", 1000, 16000, 128_000, {})
    renamed = ServerProfile("max_completion_tokens", reasoning=True)
    assert fields.without_refused(ServerProfile(), "max_tokens", set()) == renamed
    assert fields.without_refused(ServerProfile(), "max_tokens", {"max_tokens"}) is None
    assert fields.without_refused(ServerProfile(), "max_tokens", {"max_completion_tokens"}) is None


def test_an_answer_out_of_tokens_names_the_cap_to_raise() -> None:
    fields = RequestFields("gpt-6-luna", "high", 1000, 16000, 128_000, {})
    profile = ServerProfile.assumed("gpt-6-luna", "high")
    error = fields.out_of_tokens(profile, 16000, {"reasoning_tokens": 15000})
    assert "16000 output tokens, 15000 of them reasoning" in error.message
    assert "OPENAI_REASONING_MAX_OUTPUT_TOKENS" in error.message


# ------------------------------------------------------------------ the endpoint


def endpoint(key_header: str = "Authorization", api_version: str | None = None) -> ModelEndpoint:
    """An endpoint with the key ``sk-secret``."""
    pattern = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
    return ModelEndpoint(
        "http://server/v1", "llava", "sk-secret", key_header, api_version, 20.0, pattern
    )


def test_azure_takes_its_api_version_in_the_url_and_the_key_in_its_header() -> None:
    azure = endpoint("api-key", "2024-10-21")
    assert (
        azure.url("chat/completions") == "http://server/v1/chat/completions?api-version=2024-10-21"
    )
    assert azure.headers("r1") == {"api-key": "sk-secret", "X-Client-Request-Id": "r1"}
    assert endpoint().headers() == {"Authorization": "Bearer sk-secret"}


def test_a_reply_is_the_completion_or_the_error_it_holds_without_the_key() -> None:
    completion = {"choices": [{"message": {"content": "{}"}}]}
    reply = UpstreamReply(200, {}, b'{"choices": [{"message": {"content": "{}"}}]}')
    assert endpoint().read_reply(reply, {}, 0.1) == completion
    refusal = UpstreamReply(200, {}, b'{"error": {"message": "bad key sk-secret"}}')
    with pytest.raises(UpstreamError) as refused:
        endpoint().read_reply(refusal, {}, 0.1)
    assert "sk-secret" not in refused.value.message
    with pytest.raises(TransientUpstreamError):
        endpoint().read_reply(UpstreamReply(503, {}, b"busy"), {}, 0.1)


def test_an_attempt_without_an_answer_is_classed_by_what_stopped_it() -> None:
    assert isinstance(connection_failure(requests.Timeout(), 5.0), UpstreamTimeout)
    assert type(connection_failure(AnswerTooLarge(), 5.0)) is UpstreamError
    assert isinstance(connection_failure(requests.ConnectionError(), 5.0), TransientUpstreamError)


# ------------------------------------------------------------------ the probe and the shutdown


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "reachable"),
        (403, "key rejected"),
        (404, "model not found"),
        (502, "error (HTTP 502)"),
    ],
)
def test_probe_verdict_names_what_the_status_means(status: int, verdict: str) -> None:
    assert probe_verdict(status) == verdict


@pytest.mark.parametrize(
    ("described", "shown"),
    [
        ({"shutdown_date": "2027-02-01"}, "2027-02-01"),
        ({"shutdown_date": None}, NO_SHUTDOWN_ANNOUNCED),
        ({"shutdown_date": "2027-2-1"}, SHUTDOWN_UNKNOWN),
        ({"shutdown_date": "2027-02-30"}, SHUTDOWN_UNKNOWN),
        ({}, SHUTDOWN_UNKNOWN),
        (None, SHUTDOWN_UNKNOWN),
    ],
)
def test_shutdown_in_reads_only_a_strict_date(described: object, shown: str) -> None:
    assert shutdown_in(described) == shown


def test_the_shutdown_watch_warns_once_a_day_by_its_own_clock() -> None:
    today = date(2026, 12, 3)
    days: list[int] = []
    watch = ShutdownWatch("gpt-6-luna", 60, days.append, lambda: today)
    shutdown = (today + timedelta(days=30)).isoformat()
    watch.watch(shutdown)
    watch.watch(shutdown)
    assert watch.announced() == shutdown
    assert days == [30, 30]
    assert watch.shutdown_warned == today
    today += timedelta(days=1)
    watch.watch(shutdown)
    assert days[-1] == 29
    assert watch.shutdown_warned == today


# ------------------------------------------------------------------ the Responses API's shapes


def test_a_chat_body_becomes_a_responses_body() -> None:
    chat: dict[str, Any] = {
        "model": "gpt-5-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}},
                ],
            },
        ],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}},
        "max_completion_tokens": 100,
        "reasoning_effort": "low",
        "top_k": 20,
    }
    assert as_responses_body(chat) == {
        "model": "gpt-5-mini",
        "instructions": "Be brief.",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "data:x", "detail": "low"},
                ],
            }
        ],
        "text": {"format": {"type": "json_schema", "name": "n", "schema": {}}},
        "max_output_tokens": 100,
        "reasoning": {"effort": "low"},
        "top_k": 20,
        "store": False,
    }


def test_a_responses_answer_reads_as_a_completion() -> None:
    answer = ResponsesServer.response(
        '{"a": 1}', model="gpt-5-mini", reasoning_tokens=5, cached_tokens=3
    ).body
    assert isinstance(answer, dict)
    completion = as_chat_completion(answer)
    assert completion["model"] == "gpt-5-mini"
    assert completion["choices"][0]["message"]["content"] == '{"a": 1}'
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert token_usage(completion) == {
        "prompt_tokens": 900,
        "completion_tokens": 85,
        "total_tokens": 985,
        "reasoning_tokens": 5,
        "cached_tokens": 3,
    }
    cut = ResponsesServer.response("{", incomplete="max_output_tokens").body
    assert isinstance(cut, dict)
    assert as_chat_completion(cut)["choices"][0]["finish_reason"] == "length"
