"""Saves without duplicates: a save=true request repeated with the same Idempotency-Key (its first
response lost on the way back) answers the first entry instead of creating a second one."""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app import Config
from tests import images
from tests.conftest import app_for
from tests.fakes import ChatCompletionsServer, RedisServer, Reply, UserServiceServer, json_error

MEAL = images.jpeg(64, 48, color=(200, 120, 60))
OTHER_MEAL = images.jpeg(64, 48, color=(30, 140, 90))
KEY = "6f1c2a7e-save-attempt-1"
IDEMPOTENCY_PATTERN = "idempotency:*"
DAY_SECONDS = 24 * 3600


def save(
    client: FlaskClient,
    headers: dict[str, str],
    key: str | None = KEY,
    data: bytes = MEAL,
    query: str = "?save=true",
) -> TestResponse:
    """POST a photo to /analyze-food, with the Idempotency-Key when one is given."""
    sent = dict(headers) if key is None else {**headers, "Idempotency-Key": key}
    return client.post(
        f"/analyze-food{query}",
        data={"image": (io.BytesIO(data), "meal.jpg")},
        headers=sent,
        content_type="multipart/form-data",
    )


def idempotency_keys(redis: RedisServer) -> list[bytes]:
    """Every idempotency record in the tests' Redis."""
    with redis.client() as connection:
        return list(connection.keys(IDEMPOTENCY_PATTERN))


@pytest.fixture
def memory_client(make_config: Callable[..., Config]) -> FlaskClient:
    """A client for an app without Redis: records live in the in-process store."""
    return app_for(make_config(with_redis=False)).test_client()


# ------------------------------------------------------------------ a retry after a lost response


def test_retry_of_a_save_whose_response_was_lost_returns_the_first_entry_id(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    first = save(client, auth_headers)  # the client never sees this answer

    retry = save(client, auth_headers)

    assert first.status_code == retry.status_code == 200
    assert retry.get_json()["analysis"]["entryId"] == first.get_json()["analysis"]["entryId"]


def test_replay_is_the_first_response_body_exactly(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    first = save(client, auth_headers)

    retry = save(client, auth_headers)

    assert retry.get_json() == first.get_json()


def test_replay_is_marked_idempotent_replayed(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    save(client, auth_headers)

    retry = save(client, auth_headers)

    assert retry.headers.get("Idempotent-Replayed") == "true"


def test_first_save_with_a_key_is_not_marked_replayed(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    first = save(client, auth_headers)

    assert "Idempotent-Replayed" not in first.headers


def test_retry_of_a_lost_save_stores_one_entry_and_asks_the_model_once(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> None:
    save(client, auth_headers)

    save(client, auth_headers)
    save(client, auth_headers)

    assert len(user_service.entries) == 1
    assert len(user_service.calls) == 1
    assert len(model.calls) == 1


def test_idempotency_record_is_kept_in_redis_for_24_hours(
    client: FlaskClient, auth_headers: dict[str, str], redis: RedisServer
) -> None:
    save(client, auth_headers)

    [record] = idempotency_keys(redis)
    with redis.client() as connection:
        ttl = connection.ttl(record)

    assert DAY_SECONDS - 60 <= ttl <= DAY_SECONDS


def test_idempotency_record_name_does_not_hold_the_raw_key(
    client: FlaskClient, auth_headers: dict[str, str], redis: RedisServer
) -> None:
    save(client, auth_headers)

    [record] = idempotency_keys(redis)

    assert KEY.encode() not in record


def test_without_redis_retry_of_a_lost_save_returns_the_first_entry_id(
    memory_client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    first = save(memory_client, auth_headers)

    retry = save(memory_client, auth_headers)

    assert retry.status_code == 200
    assert retry.get_json()["analysis"]["entryId"] == first.get_json()["analysis"]["entryId"]
    assert retry.headers.get("Idempotent-Replayed") == "true"


def test_without_redis_retry_of_a_lost_save_stores_one_entry(
    memory_client: FlaskClient, auth_headers: dict[str, str], user_service: UserServiceServer
) -> None:
    save(memory_client, auth_headers)

    save(memory_client, auth_headers)

    assert len(user_service.entries) == 1


def test_without_redis_record_outlives_the_analyses_of_later_photos(
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    user_service: UserServiceServer,
) -> None:
    client = app_for(make_config(with_redis=False, store_max_mb=0.01)).test_client()
    first = save(client, auth_headers)
    for shade in range(5):  # more photos than the embedded cache holds
        save(
            client, auth_headers, key=None, data=images.jpeg(32, 24, color=(shade, 9, 9)), query=""
        )

    retry = save(client, auth_headers)

    assert retry.get_json()["analysis"]["entryId"] == first.get_json()["analysis"]["entryId"]
    assert len(user_service.entries) == 1


def test_records_in_redis_serve_a_retry_that_reaches_another_instance(
    make_config: Callable[..., Config],
    auth_headers: dict[str, str],
    user_service: UserServiceServer,
) -> None:
    config = make_config()
    first = save(app_for(config).test_client(), auth_headers)

    retry = save(app_for(config).test_client(), auth_headers)

    assert retry.get_json()["analysis"]["entryId"] == first.get_json()["analysis"]["entryId"]
    assert len(user_service.entries) == 1


# ------------------------------------------------------------------ the same key, another request


def test_key_reused_with_another_photo_answers_422_idempotency_key_reused(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    save(client, auth_headers, data=MEAL)

    response = save(client, auth_headers, data=OTHER_MEAL)

    assert response.status_code == 422
    assert response.get_json()["code"] == "idempotency_key_reused"


def test_key_reused_with_another_photo_saves_nothing_more(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> None:
    save(client, auth_headers, data=MEAL)

    save(client, auth_headers, data=OTHER_MEAL)

    assert len(user_service.entries) == 1
    assert len(model.calls) == 1


def test_duplicate_sent_while_the_first_is_in_flight_answers_409(
    app: Flask, auth_headers: dict[str, str], user_service: UserServiceServer
) -> None:
    user_service.enqueue(Reply(201, {"id": "entry-slow"}, delay=0.2))

    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(save, app.test_client(), auth_headers)
        user_service.wait_for_requests(1)  # the first request is now saving
        duplicate = save(app.test_client(), auth_headers)
        first_status = first.result().status_code

    assert duplicate.status_code == 409
    assert duplicate.get_json()["code"] == "idempotency_key_in_progress"
    assert first_status == 200
    assert len(user_service.calls) == 1


def test_failed_first_attempt_releases_the_key_so_the_retry_saves(
    client: FlaskClient, auth_headers: dict[str, str], user_service: UserServiceServer
) -> None:
    user_service.enqueue(json_error(500, "database down"))
    failed = save(client, auth_headers)

    retry = save(client, auth_headers)

    assert failed.status_code == 502
    assert retry.status_code == 200
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.get_json()["analysis"]["entryId"] == user_service.entries[0]["id"]
    assert len(user_service.entries) == 1


def test_failed_model_call_releases_the_key_so_the_retry_saves(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> None:
    model.enqueue(*[ChatCompletionsServer.error(500)] * 3)
    failed = save(client, auth_headers)

    retry = save(client, auth_headers)

    assert failed.status_code == 502
    assert retry.status_code == 200
    assert len(user_service.entries) == 1


def test_another_user_with_the_same_key_gets_an_entry_of_its_own(
    client: FlaskClient,
    auth_headers: dict[str, str],
    make_token: Callable[..., str],
    user_service: UserServiceServer,
) -> None:
    other_user = {"Authorization": f"Bearer {make_token(sub='user-7')}"}
    mine = save(client, auth_headers)

    theirs = save(client, other_user)

    assert theirs.status_code == 200
    assert "Idempotent-Replayed" not in theirs.headers
    assert theirs.get_json()["analysis"]["entryId"] != mine.get_json()["analysis"]["entryId"]
    assert [entry["userId"] for entry in user_service.entries] == ["user-42", "user-7"]


# ------------------------------------------------------------------ when the key does not apply


def test_key_without_save_leaves_no_record(
    client: FlaskClient, auth_headers: dict[str, str], redis: RedisServer
) -> None:
    response = save(client, auth_headers, query="")

    assert response.status_code == 200
    assert idempotency_keys(redis) == []


def test_key_used_first_without_save_does_not_block_a_later_save(
    client: FlaskClient, auth_headers: dict[str, str], user_service: UserServiceServer
) -> None:
    save(client, auth_headers, query="?save=false")

    response = save(client, auth_headers)

    assert response.status_code == 200
    assert "Idempotent-Replayed" not in response.headers
    assert len(user_service.entries) == 1


def test_save_without_a_key_leaves_no_record(
    client: FlaskClient, auth_headers: dict[str, str], redis: RedisServer
) -> None:
    save(client, auth_headers, key=None)

    assert idempotency_keys(redis) == []


INVALID_KEYS = {
    "empty": "",
    "too long": "k" * 256,
    "far too long": "k" * 300,
    "space": "save attempt 1",
    "non-ascii": "clé-1",
    "tab": "save\tattempt",
}


@pytest.mark.parametrize("key", INVALID_KEYS.values(), ids=INVALID_KEYS.keys())
def test_invalid_key_answers_400_invalid_parameter(
    client: FlaskClient, auth_headers: dict[str, str], key: str
) -> None:
    response = save(client, auth_headers, key=key)

    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_parameter"


@pytest.mark.parametrize("key", INVALID_KEYS.values(), ids=INVALID_KEYS.keys())
def test_invalid_key_reaches_neither_the_model_nor_the_user_service(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    key: str,
) -> None:
    save(client, auth_headers, key=key)

    assert model.calls == []
    assert user_service.calls == []


def test_invalid_key_without_save_is_ignored(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    response = save(client, auth_headers, key="k" * 300, query="")

    assert response.status_code == 200


def test_key_of_255_visible_characters_is_accepted(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    key = "".join(chr(33 + index % 94) for index in range(255))

    response = save(client, auth_headers, key=key)

    assert response.status_code == 200
    assert save(client, auth_headers, key=key).headers.get("Idempotent-Replayed") == "true"
