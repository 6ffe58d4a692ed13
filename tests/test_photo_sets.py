"""A meal in several photos: one model call for the set, and the cache, single flight and
Idempotency-Key over the set, whatever the order of its photos; through HTTP against the loopback
model and User Service."""

from __future__ import annotations

import base64
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app import set_digest
from tests import images
from tests.conftest import (
    MEAL,
    assert_json_error,
    bearer,
    post_photo,
    running_gunicorn,
    slow_answer,
)
from tests.fakes import (
    DEFAULT_ANALYSIS,
    ChatCompletionsServer,
    RedisServer,
    UserServiceServer,
    answer_with,
)

PLATE = images.jpeg(80, 60, color=(200, 120, 60))
SIDE = images.jpeg(80, 60, color=(30, 150, 60))
LABEL = images.jpeg(60, 80, color=(240, 240, 230))
# What the model says of a set, numbering the photos as it saw them (in the set's fixed order).
TWO_ITEMS = [
    {
        "name": "grilled salmon",
        "grams": 150,
        "calories": 310,
        "protein": 34,
        "carbs": 0,
        "fat": 19,
        "confidence": 0.9,
        "photos": [1],
    },
    {
        "name": "rice",
        "grams": 180,
        "calories": 234,
        "protein": 4.3,
        "carbs": 51.5,
        "fat": 0.5,
        "confidence": 0.8,
        "photos": [1, 2],
    },
]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fixed_order(*photos: bytes) -> list[bytes]:
    """The photos as the model sees them: by digest, whatever the upload order."""
    return sorted(set(photos), key=digest)


def post_photos(
    client: FlaskClient,
    headers: dict[str, str],
    *photos: bytes,
    query: str = "",
    names: tuple[str, ...] = (),
) -> TestResponse:
    """POST several photos as ``image`` file parts, in this order."""
    parts = [
        (io.BytesIO(photo), names[at] if at < len(names) else f"photo-{at + 1}.jpg")
        for at, photo in enumerate(photos)
    ]
    return client.post(
        f"/analyze-food{query}",
        data={"image": parts},
        headers=headers,
        content_type="multipart/form-data",
    )


def sent_images(call_json: dict[str, Any]) -> list[bytes]:
    """The JPEGs one model request carried, in its order."""
    content = call_json["messages"][1]["content"]
    return [
        base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
        for part in content
        if part["type"] == "image_url"
    ]


# ------------------------------------------------------------------ one call for the set


def test_two_photos_make_one_call_with_two_image_parts_each_labelled(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    model.analysis = {**DEFAULT_ANALYSIS, "items": TWO_ITEMS}

    response = post_photos(client, auth_headers, PLATE, SIDE)

    assert response.status_code == 200, response.get_json()
    [call] = model.calls
    body = call.json()
    assert len(sent_images(body)) == 2
    texts = [part["text"] for part in body["messages"][1]["content"] if part["type"] == "text"]
    assert "these 2 photos" in texts[0]
    assert texts[-2:] == ["Photo 1:", "Photo 2:"]
    assert "several photos" in body["messages"][0]["content"]
    assert response.get_json()["analysis"]["photoCount"] == 2


def test_the_model_sees_the_photos_in_one_order_whatever_the_upload_order(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    post_photos(client, auth_headers, PLATE, SIDE, LABEL)
    post_photos(client, auth_headers, LABEL, PLATE, SIDE, query="?lang=de")  # not cached: asks

    first, second = (sent_images(call.json()) for call in model.calls)
    assert len(first) == 3
    assert first == second


def test_items_say_which_photos_show_them_in_the_callers_own_order(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    model.analysis = {**DEFAULT_ANALYSIS, "items": TWO_ITEMS}
    seen_first, seen_second = fixed_order(PLATE, SIDE)

    response = post_photos(client, auth_headers, seen_second, seen_first)

    salmon, rice = response.get_json()["analysis"]["items"]
    assert salmon["photos"] == [2]  # the model's photo 1 was the caller's second
    assert rice["photos"] == [1, 2]


def test_the_same_photos_in_another_order_are_a_cache_hit_renumbered(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    model.analysis = {**DEFAULT_ANALYSIS, "items": TWO_ITEMS}
    seen_first, seen_second = fixed_order(PLATE, SIDE)

    first = post_photos(client, auth_headers, seen_first, seen_second)
    again = post_photos(client, auth_headers, seen_second, seen_first)

    assert (first.get_json()["source"], again.get_json()["source"]) == ("api", "cache")
    assert len(model.calls) == 1
    assert first.get_json()["analysis"]["items"][0]["photos"] == [1]
    assert again.get_json()["analysis"]["items"][0]["photos"] == [2]


def test_a_photo_sent_twice_counts_once(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    model.analysis = {**DEFAULT_ANALYSIS, "items": TWO_ITEMS}

    twice = post_photos(client, auth_headers, PLATE, SIDE, PLATE)
    once = post_photos(client, auth_headers, SIDE, PLATE)

    assert len(sent_images(model.calls[0].json())) == 2
    assert once.get_json()["source"] == "cache"
    analysis = twice.get_json()["analysis"]
    assert analysis["photoCount"] == 2
    salmon, rice = analysis["items"]
    # The model's photo 1 is the first by digest; the plate is at the caller's places 1 and 3.
    assert salmon["photos"] == ([1, 3] if fixed_order(PLATE, SIDE)[0] == PLATE else [2])
    assert rice["photos"] == [1, 2, 3]


def test_a_photo_alone_and_the_same_photo_in_a_set_are_different_requests(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    post_photo(client, auth_headers, PLATE)
    in_a_set = post_photos(client, auth_headers, PLATE, SIDE)

    assert in_a_set.get_json()["source"] == "api"
    assert len(model.calls) == 2


# ------------------------------------------------------------------ refusals


def test_a_set_with_a_truncated_photo_answers_400_naming_it_and_asks_no_model(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    cut = PLATE[: len(PLATE) // 2]

    response = post_photos(client, auth_headers, SIDE, cut, names=("side.jpg", "plate-cut.jpg"))

    assert_json_error(response, 400, "invalid_image")
    assert response.get_json()["error"].startswith("photo 2 (plate-cut.jpg): ")
    assert model.calls == []


def test_an_empty_photo_in_a_set_is_named(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    response = post_photos(client, auth_headers, PLATE, SIDE, b"", names=("a", "b", "c.jpg"))

    assert_json_error(response, 400, "empty_image")
    assert response.get_json()["error"] == "photo 3 (c.jpg) is empty"
    assert model.calls == []


def test_six_photos_answer_too_many_images_and_ask_no_model(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    photos = [images.jpeg(40, 30, color=(shade * 40, 0, 0)) for shade in range(6)]

    response = post_photos(client, auth_headers, *photos)

    assert_json_error(response, 400, "too_many_images")
    assert "at most 5 photos" in response.get_json()["error"]
    assert model.calls == []


def test_max_images_sets_the_limit(
    client_with: Any, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    client = client_with(max_images=2)

    assert_json_error(post_photos(client, auth_headers, PLATE, SIDE, LABEL), 400, "too_many_images")
    assert post_photos(client, auth_headers, PLATE, SIDE).status_code == 200


# ------------------------------------------------------------------ saving and Idempotency-Key


def test_three_photos_saved_make_one_entry_with_the_sets_digest_and_each_photos(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> None:
    response = post_photos(client, auth_headers, LABEL, PLATE, SIDE, query="?save=true")

    assert response.status_code == 200
    [call] = user_service.calls
    entry = call.json()
    assert entry["imageHash"] == set_digest([digest(PLATE), digest(SIDE), digest(LABEL)])
    assert entry["imageHashes"] == [digest(LABEL), digest(PLATE), digest(SIDE)]
    assert entry["photoCount"] == 3
    assert response.get_json()["analysis"]["entryId"] == user_service.entries[0]["id"]


def test_one_key_with_another_set_answers_422(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> None:
    headers = {**auth_headers, "Idempotency-Key": "dinner-2"}

    first = post_photos(client, headers, PLATE, SIDE, query="?save=true")
    other = post_photos(client, headers, PLATE, LABEL, query="?save=true")

    assert first.status_code == 200
    assert_json_error(other, 422, "idempotency_key_reused")
    assert len(user_service.entries) == 1


def test_a_retry_in_another_order_replays_the_entry_renumbered(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> None:
    model.analysis = {**DEFAULT_ANALYSIS, "items": TWO_ITEMS}
    headers = {**auth_headers, "Idempotency-Key": "dinner-3"}
    seen_first, seen_second = fixed_order(PLATE, SIDE)

    first = post_photos(client, headers, seen_first, seen_second, query="?save=true")
    retry = post_photos(client, headers, seen_second, seen_first, query="?save=true")

    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.get_json()["analysis"]["entryId"] == first.get_json()["analysis"]["entryId"]
    assert first.get_json()["analysis"]["items"][0]["photos"] == [1]
    assert retry.get_json()["analysis"]["items"][0]["photos"] == [2]
    assert user_service.calls[0].json()["items"][0]["photos"] == [1]
    assert len(user_service.entries) == 1


# ------------------------------------------------------------------ the model's photo numbers


def test_photo_numbers_outside_the_set_are_dropped(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    item = {**TWO_ITEMS[0], "photos": [0, 2, 7, 2, "1", 1.5]}
    model.enqueue(answer_with(items=[item]))
    seen_first, seen_second = fixed_order(PLATE, SIDE)

    response = post_photos(client, auth_headers, seen_first, seen_second)

    assert response.get_json()["analysis"]["items"][0]["photos"] == [2]


def test_a_single_photos_items_are_all_in_it(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    model.enqueue(answer_with(items=[{**TWO_ITEMS[0], "photos": [3]}]))

    analysis = post_photo(client, auth_headers, MEAL).get_json()["analysis"]

    assert analysis["items"][0]["photos"] == [1]
    assert analysis["photoCount"] == 1


# ------------------------------------------------------------------ over two workers


def test_twenty_identical_two_photo_uploads_over_two_workers_make_one_call(
    redis_server: RedisServer,
    model_server: ChatCompletionsServer,
    user_service_server: UserServiceServer,
    tmp_path: Path,
) -> None:
    model_server.reset()
    model_server.analysis = {**DEFAULT_ANALYSIS, "items": TWO_ITEMS}
    files = [("image", ("a.jpg", PLATE, "image/jpeg")), ("image", ("b.jpg", SIDE, "image/jpeg"))]
    with running_gunicorn(
        redis_server,
        model_server,
        user_service_server,
        tmp_path,
        GUNICORN_WORKERS="2",
        GUNICORN_THREADS="12",
    ) as server:

        def upload(turn: int) -> requests.Response:
            ordered = files if turn % 2 else files[::-1]
            return requests.post(
                f"{server.url}/analyze-food", files=ordered, headers=bearer(), timeout=30
            )

        model_server.enqueue(slow_answer(model_server, 1.0))
        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(upload, range(20)))
    assert [response.status_code for response in responses] == [200] * 20
    assert len(model_server.calls) == 1
    sources = sorted(response.json()["source"] for response in responses)
    assert sources == ["api"] + ["cache"] * 19
