"""Failing neighbours: a hung or dead Redis behind a circuit breaker, a broken model, a bad User
Service. Each is a real process or socket; what the caller gets is the contract's answer."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask.testing import FlaskClient

from app import Config, create_app
from tests.conftest import AnalyzeActions, app_for, cached_keys, post_photo
from tests.fakes import (
    DEFAULT_ANALYSIS,
    ChatCompletionsServer,
    RedisServer,
    Reply,
    StalledServer,
    UserServiceServer,
    answer_with,
    free_port,
)
from tests.images import photo

# The issue's own bound: a hung Redis adds "well under a second", that is one REDIS_TIMEOUT
# (0.5 s by default) a request, never one per Redis call.
UNDER_A_SECOND = 1.0
SKIPPED_METRIC = re.compile(r'^image_service_cache_events_total\{event="skipped"\} (\S+)$', re.M)
completion = ChatCompletionsServer.completion
model_error = ChatCompletionsServer.error


def skipped_count(client: FlaskClient) -> float:
    """The process-wide count of Redis calls the breaker skipped, from /metrics."""
    found = SKIPPED_METRIC.search(client.get("/metrics").get_data(as_text=True))
    return float(found.group(1)) if found else 0.0


def open_the_breaker(client: FlaskClient, headers: dict[str, str], failures: int = 2) -> None:
    """Send as many requests as the breaker's threshold; each meets the failing Redis."""
    for shade in range(200, 200 + failures):
        assert post_photo(client, headers, photo(shade)).status_code == 200


def contract_fields(analysis: dict[str, Any]) -> dict[str, Any]:
    """The fields the contract names (more may be added), as the model's default answer has them."""
    return {name: analysis.get(name) for name in DEFAULT_ANALYSIS}


@pytest.fixture
def hung_redis_client(
    make_config: Callable[..., Config], stalled: StalledServer
) -> Callable[..., FlaskClient]:
    """A client for an app whose Redis hangs: 0.05 s timeouts, breaker opening after 2 failures."""

    def build(**overrides: Any) -> FlaskClient:
        settings: dict[str, Any] = {
            "redis_host": stalled.host,
            "redis_port": stalled.port,
            "redis_timeout": 0.05,
            "redis_breaker_failures": 2,
            "redis_breaker_cooldown": 60.0,
            **overrides,
        }
        return app_for(make_config(**settings)).test_client()

    return build


# ------------------------------------------------------------------ the breaker, through HTTP


def test_requests_answer_200_while_redis_hangs_before_and_after_the_breaker_opens(
    api: AnalyzeActions, hung_redis_client: Callable[..., FlaskClient]
) -> None:
    client = hung_redis_client()

    statuses = [api.analyze(photo(shade), client=client).status_code for shade in range(4)]

    assert statuses == [200, 200, 200, 200]


def test_open_breaker_makes_no_new_connections_to_a_hung_redis(
    api: AnalyzeActions,
    hung_redis_client: Callable[..., FlaskClient],
    auth_headers: dict[str, str],
    stalled: StalledServer,
) -> None:
    client = hung_redis_client()
    open_the_breaker(client, auth_headers)
    opened_at = stalled.accepted

    for shade in range(2, 6):
        api.analyze(photo(shade), client=client)

    assert opened_at > 0
    assert stalled.accepted == opened_at


def test_open_breaker_counts_the_skipped_redis_calls(
    api: AnalyzeActions, hung_redis_client: Callable[..., FlaskClient], auth_headers: dict[str, str]
) -> None:
    client = hung_redis_client()
    open_the_breaker(client, auth_headers)
    before = skipped_count(client)

    api.analyze(photo(2), client=client)

    assert skipped_count(client) > before


def test_hung_redis_costs_the_first_request_one_attempt_with_default_settings(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    model: ChatCompletionsServer,
    stalled: StalledServer,
) -> None:
    config = make_config(redis_host=stalled.host, redis_port=stalled.port)
    client = app_for(config).test_client()

    response = api.analyze(photo(1), client=client)

    assert response.status_code == 200
    assert response.get_json()["source"] == "api"
    assert len(model.calls) == 1
    # The first failure makes the request skip Redis for the rest: it waits one REDIS_TIMEOUT,
    # which is what keeps a hung Redis "well under a second".
    assert stalled.accepted == 1
    assert config.redis_timeout < UNDER_A_SECOND


def test_breaker_tries_redis_again_after_the_cool_off(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    stalled: StalledServer,
) -> None:
    now = [0.0]
    config = make_config(
        redis_host=stalled.host,
        redis_port=stalled.port,
        redis_timeout=0.05,
        redis_breaker_failures=2,
        redis_breaker_cooldown=60.0,
    )
    flask_app = create_app(config, clock=lambda: now[0])
    flask_app.testing = True
    client = flask_app.test_client()
    open_the_breaker(client, auth_headers)
    opened_at = stalled.accepted
    now[0] += 61.0

    response = api.analyze(photo(2), client=client)

    assert response.status_code == 200
    # One trial (the GET); it fails, the breaker reopens and the SET is skipped.
    assert stalled.accepted == opened_at + 1


def test_only_one_request_tries_redis_when_the_cool_off_ends(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    stalled: StalledServer,
) -> None:
    now = [0.0]
    config = make_config(
        redis_host=stalled.host,
        redis_port=stalled.port,
        redis_timeout=0.05,
        redis_breaker_failures=1,
        redis_breaker_cooldown=60.0,
    )
    flask_app = create_app(config, clock=lambda: now[0])
    flask_app.testing = True
    open_the_breaker(flask_app.test_client(), auth_headers, failures=1)
    opened_at = stalled.accepted
    # The clock stands still past the cool-off while the requests arrive, so the trial's own
    # length does not matter: only the first to ask the breaker may try Redis.
    now[0] += 61.0

    def analyse(shade: int) -> int:
        return api.analyze(photo(shade), client=flask_app.test_client()).status_code

    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(analyse, range(10, 14)))

    assert statuses == [200] * 4
    assert stalled.accepted == opened_at + 1, "half-open should let a single trial call through"


def test_redis_that_comes_back_closes_the_breaker_and_the_cache_works_again(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    redis: RedisServer,
) -> None:
    now = [0.0]
    config = make_config(redis_breaker_failures=2, redis_breaker_cooldown=60.0)
    flask_app = create_app(config, clock=lambda: now[0])
    flask_app.testing = True
    client = flask_app.test_client()
    redis.stop()
    open_the_breaker(client, auth_headers)
    redis.start()
    now[0] += 61.0
    meal = photo(2)

    first = api.analyze(meal, client=client).get_json()
    second = api.analyze(meal, client=client).get_json()

    assert (first["source"], second["source"]) == ("api", "cache")
    assert len(cached_keys(redis)) == 1


def test_health_still_pings_redis_while_the_breaker_is_open(
    hung_redis_client: Callable[..., FlaskClient],
    auth_headers: dict[str, str],
    stalled: StalledServer,
) -> None:
    client = hung_redis_client()
    open_the_breaker(client, auth_headers)
    opened_at = stalled.accepted

    response = client.get("/health")

    assert response.status_code == 503
    assert response.get_json()["checks"]["redis"] == "connection failed"
    assert stalled.accepted == opened_at + 1


def test_every_request_answers_200_with_redis_at_a_closed_port(
    api: AnalyzeActions, make_config: Callable[..., Config]
) -> None:
    config = make_config(redis_host="127.0.0.1", redis_port=free_port())
    client = app_for(config).test_client()

    responses = [api.analyze(photo(shade), client=client) for shade in range(4)]

    assert [response.status_code for response in responses] == [200] * 4
    assert {response.get_json()["source"] for response in responses} == {"api"}


def test_redis_at_a_closed_port_is_skipped_once_the_breaker_opens(
    api: AnalyzeActions, make_config: Callable[..., Config], auth_headers: dict[str, str]
) -> None:
    config = make_config(redis_host="127.0.0.1", redis_port=free_port(), redis_breaker_failures=2)
    client = app_for(config).test_client()
    open_the_breaker(client, auth_headers)
    before = skipped_count(client)

    api.analyze(photo(2), client=client)

    assert skipped_count(client) > before


# ------------------------------------------------------------------ a model that fails


def test_rate_limit_with_retry_after_on_every_attempt_answers_502_upstream_error(
    api: AnalyzeActions, make_config: Callable[..., Config], model: ChatCompletionsServer
) -> None:
    model.enqueue(*[model_error(429, "Rate limit reached", headers={"retry-after-ms": "5"})] * 3)
    client = app_for(make_config(openai_retry_after_cap=0.01)).test_client()

    response = api.analyze(photo(1), client=client)

    assert response.status_code == 502
    assert response.get_json()["code"] == "upstream_error"
    assert "Retry-After" not in response.headers
    assert len(model.calls) == 3


def test_rate_limit_on_every_attempt_caches_nothing(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    model: ChatCompletionsServer,
    redis: RedisServer,
) -> None:
    model.enqueue(*[model_error(429, "Rate limit reached", headers={"retry-after-ms": "5"})] * 3)
    client = app_for(make_config(openai_retry_after_cap=0.01)).test_client()

    api.analyze(photo(1), client=client)

    assert cached_keys(redis) == []


def test_unreachable_model_caches_nothing(
    api: AnalyzeActions, make_config: Callable[..., Config], redis: RedisServer
) -> None:
    config = make_config(openai_base_url=f"http://127.0.0.1:{free_port()}/v1")

    response = api.analyze(photo(1), client=app_for(config).test_client())

    assert response.status_code == 502
    assert cached_keys(redis) == []


def test_model_past_its_timeout_caches_nothing(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    model: ChatCompletionsServer,
    redis: RedisServer,
) -> None:
    model.enqueue(Reply(200, {}, delay=1.0))
    config = make_config(openai_api_timeout=0.2, openai_max_attempts=1)

    response = api.analyze(photo(1), client=app_for(config).test_client())

    assert response.status_code == 504
    assert cached_keys(redis) == []


MALFORMED_ANSWERS = {
    "truncated json body": Reply(
        200,
        b'{"choices": [{"message": {"content": "{',
        headers={"Content-Type": "application/json"},
    ),
    "content cut off at max tokens": completion(
        json.dumps(DEFAULT_ANALYSIS)[:60], finish_reason="length"
    ),
    "refusal beside usable content": completion(
        json.dumps(DEFAULT_ANALYSIS), refusal="I can't help with that."
    ),
    "absurd protein": answer_with(protein=2_500),
    "absurd carbs": answer_with(carbs=1e9),
    "infinite calories": completion(json.dumps({**DEFAULT_ANALYSIS, "calories": float("inf")})),
    "nan fat": completion(json.dumps({**DEFAULT_ANALYSIS, "fat": float("nan")})),
}


@pytest.mark.parametrize("reply", MALFORMED_ANSWERS.values(), ids=MALFORMED_ANSWERS.keys())
def test_malformed_or_absurd_answer_answers_502_upstream_error(
    api: AnalyzeActions, model: ChatCompletionsServer, reply: Reply
) -> None:
    model.enqueue(reply)

    response = api.analyze(photo(1))

    assert response.status_code == 502
    assert response.get_json()["code"] == "upstream_error"


@pytest.mark.parametrize("reply", MALFORMED_ANSWERS.values(), ids=MALFORMED_ANSWERS.keys())
def test_malformed_or_absurd_answer_caches_nothing(
    api: AnalyzeActions, model: ChatCompletionsServer, redis: RedisServer, reply: Reply
) -> None:
    model.enqueue(reply)

    api.analyze(photo(1))

    assert cached_keys(redis) == []


# ------------------------------------------------------------------ a User Service that fails


def test_user_service_dropping_the_connection_answers_502_with_the_analysis(
    api: AnalyzeActions, user_service: UserServiceServer
) -> None:
    user_service.enqueue(Reply(drop=True))

    response = api.analyze(photo(1), save=True)

    assert response.status_code == 502
    assert response.get_json()["code"] == "user_service_error"
    assert contract_fields(response.get_json()["analysis"]) == DEFAULT_ANALYSIS


def test_user_service_that_never_answers_gives_502_with_the_analysis(
    api: AnalyzeActions, make_config: Callable[..., Config], stalled: StalledServer
) -> None:
    config = make_config(user_service_url=stalled.http_url, user_service_timeout=0.2)

    response = api.analyze(photo(1), save=True, client=app_for(config).test_client())

    assert response.status_code == 502
    assert response.get_json()["code"] == "user_service_error"
    assert contract_fields(response.get_json()["analysis"]) == DEFAULT_ANALYSIS
