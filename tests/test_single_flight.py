"""Concurrent misses for one photo make one model call, across threads, workers and replicas."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from flask import Flask

from app import Config, cache_key_for, create_app, image_digest
from locks import LOCK_PREFIX
from tests import images
from tests.conftest import slow_answer
from tests.fakes import ChatCompletionsServer, RedisServer

PHOTO = images.jpeg(320, 240, color=(200, 90, 40))


def post_in_parallel(app: Flask, headers: dict[str, str], count: int) -> list[tuple[int, dict]]:
    """POST PHOTO ``count`` times at once through the Flask test client."""

    def post(_: int) -> tuple[int, dict]:
        response = app.test_client().post(
            "/analyze-food", headers=headers, data={"image": (io.BytesIO(PHOTO), "meal.jpg")}
        )
        return response.status_code, response.get_json()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(post, range(count)))


def test_concurrent_misses_in_one_process_make_one_model_call(
    app: Flask, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(slow_answer(model, 0.5))
    results = post_in_parallel(app, auth_headers, 8)
    assert [status for status, _ in results] == [200] * 8
    assert len(model.calls) == 1
    assert sorted(body["source"] for _, body in results) == ["api"] + ["cache"] * 7
    assert len({json.dumps(body["analysis"]) for _, body in results}) == 1


def test_single_flight_works_in_process_without_redis(
    make_config: Callable[..., Config], model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(slow_answer(model, 0.5))
    results = post_in_parallel(create_app(make_config(with_redis=False)), auth_headers, 6)
    assert [status for status, _ in results] == [200] * 6
    assert len(model.calls) == 1


def test_a_holder_outliving_its_lock_period_keeps_the_lock_alive(
    make_config: Callable[..., Config], model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    app = create_app(make_config(single_flight_lock_seconds=0.3))
    model.enqueue(slow_answer(model, 1.2))
    results = post_in_parallel(app, auth_headers, 5)
    assert [status for status, _ in results] == [200] * 5
    assert len(model.calls) == 1


def test_a_lock_left_by_a_dead_holder_is_taken_over_when_it_expires(
    app: Flask,
    config: Config,
    redis: RedisServer,
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
) -> None:
    lock_key = LOCK_PREFIX + cache_key_for(image_digest(PHOTO), config)
    with redis.client() as connection:
        connection.set(lock_key, "token-of-a-holder-that-died", px=400)
    status, body = post_in_parallel(app, auth_headers, 1)[0]
    assert (status, body["source"]) == (200, "api")
    assert len(model.calls) == 1


def test_waiters_get_the_holders_error_without_calling_the_model_again(
    make_config: Callable[..., Config], model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    app = create_app(make_config(openai_max_attempts=1))
    failure = dataclasses.replace(model.error(500, "overloaded"), delay=0.5)
    model.enqueue(failure, failure, failure, failure)
    results = post_in_parallel(app, auth_headers, 4)
    assert [status for status, _ in results] == [502] * 4
    assert {body["code"] for _, body in results} == {"upstream_error"}
    assert len(model.calls) == 1


def test_a_changed_model_detail_or_max_side_is_a_new_analysis(
    make_config: Callable[..., Config], model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    variants = [
        {},
        {"openai_model": "gpt-4.1"},
        {"openai_image_detail": "low"},
        {"image_max_side": 512},
        {},
    ]
    sources = []
    for overrides in variants:
        app = create_app(make_config(**overrides))
        sources.append(post_in_parallel(app, auth_headers, 1)[0][1]["source"])
    assert sources == ["api", "api", "api", "api", "cache"]
    assert len(model.calls) == 4
