"""Edges of what neighbours and callers can send: dripping answers, odd JSON, forged log lines."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask.testing import FlaskClient

from app import Config, create_app
from tests import images
from tests.conftest import OPENAI_API_KEY, RecordHandler, assert_json_error, post_photo
from tests.fakes import ChatCompletionsServer, Reply

DRIP_INTERVAL = 0.25


@pytest.fixture
def dripping_server() -> Iterator[str]:
    """An HTTP server that sends a 201 JSON answer's headers at once, then one byte at a time."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    body = json.dumps({"id": "entry-1", "choices": []}).encode() + b" " * 40

    def answer(connection: socket.socket) -> None:
        with connection:
            connection.recv(1 << 20)
            connection.sendall(
                b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            for byte in body:
                if stop.wait(DRIP_INTERVAL):
                    return
                connection.sendall(bytes([byte]))

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


def test_a_user_service_dripping_its_answer_past_the_timeout_is_a_user_service_error(
    client_with: Callable[..., FlaskClient], dripping_server: str, auth_headers: dict[str, str]
) -> None:
    client = client_with(user_service_url=dripping_server, user_service_timeout=1.0)
    response = post_photo(client, auth_headers, images.jpeg(), "?save=true")
    assert_json_error(response, 502, "user_service_error")
    assert response.get_json()["analysis"]["name"]


def test_a_model_dripping_its_answer_past_the_timeout_is_an_upstream_timeout(
    client_with: Callable[..., FlaskClient], dripping_server: str, auth_headers: dict[str, str]
) -> None:
    client = client_with(
        openai_base_url=dripping_server, openai_api_timeout=1.0, openai_max_attempts=1
    )
    response = post_photo(client, auth_headers, images.jpeg())
    assert_json_error(response, 504, "upstream_timeout")


def test_negative_token_counts_from_the_model_do_not_break_the_answer(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    reply = model.completion(json.dumps(model.analysis))
    assert isinstance(reply.body, dict)
    reply.body["usage"] = {"prompt_tokens": -5, "completion_tokens": 80, "total_tokens": 75}
    model.enqueue(reply)
    assert post_photo(client, auth_headers, images.jpeg()).status_code == 200


def test_a_number_too_large_for_a_float_is_an_upstream_error(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    content = json.dumps(model.analysis).replace('"calories": 450', '"calories": 1' + "0" * 400)
    model.enqueue(model.completion(content))
    assert_json_error(post_photo(client, auth_headers, images.jpeg()), 502, "upstream_error")


def test_absurdly_nested_json_from_the_model_is_an_upstream_error(
    client: FlaskClient, model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    model.enqueue(model.completion("[" * 100_000 + "]" * 100_000))
    assert_json_error(post_photo(client, auth_headers, images.jpeg()), 502, "upstream_error")


def test_absurdly_nested_json_from_the_user_service_keeps_the_analysis(
    client: FlaskClient, user_service: object, auth_headers: dict[str, str]
) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    user_service.enqueue(Reply(201, nested, headers={"Content-Type": "application/json"}))  # type: ignore[attr-defined]
    response = post_photo(client, auth_headers, images.jpeg(), "?save=true")
    assert_json_error(response, 502, "user_service_error")
    assert response.get_json()["analysis"]["name"]


def test_a_key_cut_short_in_a_long_upstream_message_is_still_redacted(
    client: FlaskClient,
    model: ChatCompletionsServer,
    auth_headers: dict[str, str],
    logs: RecordHandler,
) -> None:
    for filler in range(985, 1000, 3):
        model.enqueue(model.error(401, "x" * filler + OPENAI_API_KEY, "invalid_api_key"))
        post_photo(client, auth_headers, images.jpeg(color=(filler % 255, 9, 9)))
    text = logs.text()
    assert "OpenAI API request failed" in text
    assert OPENAI_API_KEY[:6] not in text


def test_a_path_cannot_forge_a_second_log_line(client: FlaskClient, logs: RecordHandler) -> None:
    client.get("/x%0A2026-01-01 00:00:00,000 INFO [admin] Cache hit FORGED")
    assert logs.lines
    assert all("\n" not in line for line in logs.lines)
    assert not any(line.lstrip().startswith("2026-01-01") for line in logs.text().splitlines())


def test_invented_methods_share_one_metrics_label(client: FlaskClient) -> None:
    for number in range(5):
        client.open("/health", method=f"BREW{number}")
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'method="BREW' not in metrics
    assert 'method="other"' in metrics


def test_requests_that_waited_for_an_overloaded_holder_also_get_retry_after(
    make_config: Callable[..., Config], model: ChatCompletionsServer, auth_headers: dict[str, str]
) -> None:
    app = create_app(make_config(model_max_concurrency=1, model_queue_timeout=0.0))
    slow = dataclasses.replace(model.completion(json.dumps(model.analysis)), delay=1.5)
    model.enqueue(slow)
    busy = images.jpeg(color=(1, 1, 1))
    waiting = images.jpeg(color=(2, 2, 2))

    def post(photo: bytes) -> tuple[int, str | None]:
        response = post_photo(app.test_client(), auth_headers, photo)
        return response.status_code, response.headers.get("Retry-After")

    with ThreadPoolExecutor(max_workers=5) as pool:
        holder = pool.submit(post, busy)
        model.wait_for_requests(1)
        time.sleep(0.05)
        results = list(pool.map(post, [waiting] * 4))
        assert holder.result()[0] == 200
    assert {status for status, _ in results} == {503}
    assert all(retry_after for _, retry_after in results)
