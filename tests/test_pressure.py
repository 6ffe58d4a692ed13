"""Bounded pressure: at most MODEL_MAX_CONCURRENCY model calls in flight per process; a request
that cannot get a slot within MODEL_QUEUE_TIMEOUT answers 503 overloaded with Retry-After."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from flask import Flask
from werkzeug.test import TestResponse

from app import Config, create_app
from tests import images
from tests.conftest import AnalyzeActions, cached_keys, post_photo
from tests.fakes import (
    DEFAULT_ANALYSIS,
    ChatCompletionsServer,
    RedisServer,
    UserServiceServer,
)

SLOW_MEAL = images.jpeg(64, 48, color=(200, 120, 60))
MEAL = images.jpeg(64, 48, color=(30, 140, 90))
MODEL_DELAY = 0.2  # how long the first model call holds the only slot, for requests that wait
GUNICORN_THREADS_DEFAULT = re.compile(r'Setting\("GUNICORN_THREADS".*\), (\d+)\),')


def one_slot_app(make_config: Callable[..., Config], queue_timeout: float) -> Flask:
    """An app allowed a single model call at a time, waiting ``queue_timeout`` for it."""
    flask_app = create_app(make_config(model_max_concurrency=1, model_queue_timeout=queue_timeout))
    flask_app.testing = True
    return flask_app


@contextmanager
def only_slot_busy(
    flask_app: Flask, headers: dict[str, str], model: ChatCompletionsServer, *, freed: bool = False
) -> Iterator[Future[TestResponse]]:
    """Within the block, one request holds the only slot: until the block ends, or, when
    ``freed``, for MODEL_DELAY, so that a request waiting in the queue gets the slot."""
    answer = ChatCompletionsServer.completion(json.dumps(DEFAULT_ANALYSIS))
    released = threading.Event()
    held = dataclasses.replace(answer, delay=MODEL_DELAY) if freed else answer
    model.enqueue(dataclasses.replace(held, hold=None if freed else released))
    with ThreadPoolExecutor(max_workers=1) as pool:
        holder = pool.submit(post_photo, flask_app.test_client(), headers, SLOW_MEAL)
        model.wait_for_requests(1)  # the holder's model call is under way
        try:
            yield holder
        finally:
            released.set()
        assert holder.result().status_code == 200


# ------------------------------------------------------------------ over the limit


def test_request_beyond_the_limit_answers_503_overloaded(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
) -> None:
    flask_app = one_slot_app(make_config, queue_timeout=0.05)

    with only_slot_busy(flask_app, auth_headers, model):
        response = api.analyze(MEAL, client=flask_app.test_client())

    assert response.status_code == 503
    assert response.get_json()["code"] == "overloaded"


def test_overloaded_answer_says_when_to_retry(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
) -> None:
    flask_app = one_slot_app(make_config, queue_timeout=0.05)

    with only_slot_busy(flask_app, auth_headers, model):
        response = api.analyze(MEAL, client=flask_app.test_client())

    assert int(response.headers["Retry-After"]) >= 1


def test_overloaded_request_never_reaches_the_model(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
) -> None:
    flask_app = one_slot_app(make_config, queue_timeout=0.05)

    with only_slot_busy(flask_app, auth_headers, model):
        api.analyze(MEAL, client=flask_app.test_client())

    assert len(model.calls) == 1


def test_overloaded_request_caches_nothing(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    redis: RedisServer,
) -> None:
    flask_app = one_slot_app(make_config, queue_timeout=0.05)

    with only_slot_busy(flask_app, auth_headers, model):
        api.analyze(MEAL, client=flask_app.test_client())

    assert len(cached_keys(redis)) == 1  # the slow meal's analysis, nothing for the other
    assert api.analyze(MEAL, client=flask_app.test_client()).get_json()["source"] == "api"


def test_overloaded_save_stores_no_entry(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> None:
    flask_app = one_slot_app(make_config, queue_timeout=0.05)

    with only_slot_busy(flask_app, auth_headers, model):
        response = api.analyze(MEAL, save=True, client=flask_app.test_client())

    assert response.status_code == 503
    assert user_service.calls == []


# ------------------------------------------------------------------ within the limit


def test_request_waits_for_a_slot_within_the_queue_timeout_and_succeeds(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
) -> None:
    flask_app = one_slot_app(make_config, queue_timeout=3.0)

    with only_slot_busy(flask_app, auth_headers, model, freed=True):
        response = api.analyze(MEAL, client=flask_app.test_client())

    assert response.status_code == 200
    assert response.get_json()["source"] == "api"
    assert len(model.calls) == 2


def test_waiting_request_calls_the_model_only_after_the_slot_is_free(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
) -> None:
    flask_app = one_slot_app(make_config, queue_timeout=3.0)

    with only_slot_busy(flask_app, auth_headers, model, freed=True):
        api.analyze(MEAL, client=flask_app.test_client())

    first, second = model.calls
    # With one slot the second call cannot arrive while the first is held (two slots: it would).
    events = model.order_of(("received", second), ("answered", first))
    order = [(event, "first" if request is first else "second") for event, request in events]
    assert order == [("answered", "first"), ("received", "second")]


def test_cache_hit_answers_while_the_only_slot_is_busy(
    api: AnalyzeActions,
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
) -> None:
    flask_app = one_slot_app(make_config, queue_timeout=0.05)
    api.analyze(MEAL, client=flask_app.test_client())  # now cached

    with only_slot_busy(flask_app, auth_headers, model):
        response = api.analyze(MEAL, client=flask_app.test_client())

    assert response.status_code == 200
    assert response.get_json()["source"] == "cache"


# ------------------------------------------------------------------ the default limit


def config_from(environ: dict[str, str], secrets_dir: Path) -> Config:
    """A Config from this environment only."""
    return Config.from_env(environ, secrets_dir)


def test_limit_follows_gunicorn_threads_when_unset(tmp_path: Path) -> None:
    config = config_from({"GUNICORN_THREADS": "8"}, tmp_path)

    assert config.model_max_concurrency == 8


def test_explicit_limit_wins_over_gunicorn_threads(tmp_path: Path) -> None:
    config = config_from({"GUNICORN_THREADS": "8", "MODEL_MAX_CONCURRENCY": "3"}, tmp_path)

    assert config.model_max_concurrency == 3


def test_limit_defaults_to_gunicorns_own_default_thread_count(tmp_path: Path) -> None:
    conf = (Path(__file__).resolve().parent.parent / "gunicorn.conf.py").read_text("utf-8")
    [gunicorn_default] = GUNICORN_THREADS_DEFAULT.findall(conf)

    assert config_from({}, tmp_path).model_max_concurrency == int(gunicorn_default)


def test_queue_timeout_defaults_to_two_seconds(tmp_path: Path) -> None:
    assert config_from({}, tmp_path).model_queue_timeout == 2.0


def test_queue_timeout_follows_its_variable(tmp_path: Path) -> None:
    assert config_from({"MODEL_QUEUE_TIMEOUT": "0.5"}, tmp_path).model_queue_timeout == 0.5
