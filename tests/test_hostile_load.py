"""Hostile load: decode memory under bursts, cut connections, odd numbers, whole-request keys."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from flask.testing import FlaskClient
from PIL import Image

from tests.conftest import (
    JWT_SECRET,
    AnalyzeActions,
    analyze_over_socket,
    assert_json_error,
    bearer,
    running_gunicorn,
)
from tests.fakes import ChatCompletionsServer, RedisServer, Reply, UserServiceServer
from tests.images import photo
from tests.servers import Gunicorn

completion = ChatCompletionsServer.completion
MEGAPIXELS_60 = (10_000, 6_000)
GIB = 1024**3


# ------------------------------------------------------------------ tiny files, huge pictures


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tiny_palette_png(width: int, height: int, colour: int) -> bytes:
    """A few-kilobyte palette PNG that decodes to width x height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * height, 9)
    palette = bytes((colour % 256, 120, 40)) + bytes(3)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"PLTE", palette)
        + png_chunk(b"IDAT", rows)
        + png_chunk(b"IEND", b"")
    )


def tiny_gif(width: int, height: int, colour: int) -> bytes:
    """A GIF of a few dozen bytes whose screen is width x height (one 1x1 frame on it)."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0)
    palette = bytes((colour % 256, 30, 200)) + bytes(3)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + palette + frame + b"\x3b"


def process_rss(pids: list[int]) -> int:
    """The resident memory of these processes, in bytes, from /proc."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(found.group(1)) * 1024 if found else 0
    return total


class RssSampler:
    """Samples the workers' summed RSS every 20 ms in a thread, keeping the peak."""

    def __init__(self, server: Gunicorn) -> None:
        self.server = server
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, process_rss(self.server.worker_pids()))

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


@pytest.fixture
def two_workers(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> Iterator[Gunicorn]:
    """A real gunicorn with two workers of 16 threads, as the service runs."""
    with running_gunicorn(
        redis, model, user_service, tmp_path, GUNICORN_WORKERS="2", GUNICORN_THREADS="16"
    ) as server:
        yield server


def test_a_burst_of_tiny_files_that_decode_to_60_megapixels_keeps_memory_bounded(
    two_workers: Gunicorn,
) -> None:
    width, height = MEGAPIXELS_60
    uploads = [
        tiny_gif(width, height, shade) if shade % 2 else tiny_palette_png(width, height, shade)
        for shade in range(24)
    ]
    assert max(len(upload) for upload in uploads) < 100_000
    before = process_rss(two_workers.worker_pids())

    with RssSampler(two_workers) as sampler, ThreadPoolExecutor(max_workers=24) as pool:
        statuses = [
            response.status_code
            for response in pool.map(lambda data: analyze_over_socket(two_workers, data), uploads)
        ]
    time.sleep(0.5)
    after = process_rss(two_workers.worker_pids())

    assert set(statuses) <= {200, 400, 503}, statuses
    assert 200 in statuses
    assert sampler.peak < 3 * GIB, f"peak {sampler.peak / GIB:.2f} GiB"
    assert after < before + (sampler.peak - before) / 2, (before, sampler.peak, after)


def test_an_image_that_alone_needs_more_than_the_budget_answers_400(
    api: AnalyzeActions,
) -> None:
    rgba = Image.new("RGBA", (16_383, 3_662), (200, 100, 50, 128))
    output = io.BytesIO()
    rgba.save(output, "WEBP", quality=10)
    response = api.analyze(output.getvalue())
    assert_json_error(response, 400, "invalid_image")
    assert "DECODE_BUDGET_MB" in response.get_json()["error"]


def test_a_decode_that_cannot_get_its_share_in_time_answers_503(
    client_with: Any, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    client = client_with(decode_budget_mb=400, model_queue_timeout=0.0)
    width, height = MEGAPIXELS_60
    uploads = [tiny_gif(width, height, shade) for shade in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(
            pool.map(
                lambda data: AnalyzeActions(client, auth_headers).analyze(data),
                uploads,
            )
        )
    statuses = sorted(response.status_code for response in responses)
    assert 200 in statuses
    assert 503 in statuses
    busy = next(response for response in responses if response.status_code == 503)
    assert busy.get_json()["code"] == "overloaded"
    assert busy.headers["Retry-After"] == "1"


# ------------------------------------------------------------------ connections cut mid-answer


def cut_reply(reply: Reply) -> Reply:
    """The same answer, hung up on halfway through its body."""
    payload, _ = reply.encode()
    reply.cut_after = len(payload) // 2
    return reply


def test_a_model_answer_cut_mid_body_is_retried(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(cut_reply(completion(json.dumps(model.analysis))))
    assert api.analyze(photo(1)).status_code == 200
    assert len(model.calls) == 2


def test_a_model_answer_cut_mid_body_every_time_answers_502(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(*(cut_reply(completion(json.dumps(model.analysis))) for _ in range(3)))
    assert_json_error(api.analyze(photo(2)), 502, "upstream_error")
    assert len(model.calls) == 3


def test_a_user_service_answer_cut_mid_body_answers_502_with_the_analysis(
    api: AnalyzeActions, user_service: UserServiceServer
) -> None:
    user_service.enqueue(cut_reply(Reply(201, {"id": "entry-1", "padding": "x" * 200})))
    response = api.analyze(photo(3), save=True)
    assert_json_error(response, 502, "user_service_error")
    assert response.get_json()["analysis"]["name"]
    assert len(user_service.calls) == 1


# ------------------------------------------------------------------ numbers from neighbours


def test_an_absurd_token_count_is_left_out_and_the_photo_answered(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    reply = completion(json.dumps(model.analysis))
    assert isinstance(reply.body, dict)
    reply.body["usage"]["prompt_tokens"] = 10**400
    model.enqueue(reply)
    assert api.analyze(photo(4)).status_code == 200


def test_a_huge_model_name_is_cut_to_a_name(
    api: AnalyzeActions, model: ChatCompletionsServer
) -> None:
    model.enqueue(completion(json.dumps(model.analysis), model="m" * 900_000))
    analysis = api.analyze(photo(5)).get_json()["analysis"]
    assert 0 < len(analysis["model"]) <= 200


def test_an_absurd_entry_id_is_not_passed_on(
    api: AnalyzeActions, user_service: UserServiceServer
) -> None:
    user_service.enqueue(Reply(201, {"id": "e" * 10_000}))
    response = api.analyze(photo(6), save=True)
    assert_json_error(response, 502, "user_service_error")


# ------------------------------------------------------------------ Idempotency-Key


def save_with_key(api: AnalyzeActions, data: bytes, key: str, **form: str) -> Any:
    """A save with this Idempotency-Key."""
    headers = {**api.headers, "Idempotency-Key": key}
    return api.analyze(data, save=True, headers=headers, form=form or None)


@pytest.mark.parametrize("change", [{"note": "with extra rice"}, {"lang": "pt-BR"}])
def test_the_same_key_with_another_note_or_language_is_refused(
    api: AnalyzeActions, change: dict[str, str]
) -> None:
    assert save_with_key(api, photo(7), "key-note-1").status_code == 200
    if "lang" in change:
        headers = {**api.headers, "Idempotency-Key": "key-note-1"}
        response = api.analyze(
            photo(7), save=True, headers=headers, query=f"?lang={change['lang']}"
        )
    else:
        response = save_with_key(api, photo(7), "key-note-1", **change)
    assert_json_error(response, 422, "idempotency_key_reused")


def test_the_idempotency_key_is_forwarded_to_the_user_service(
    api: AnalyzeActions, user_service: UserServiceServer
) -> None:
    assert save_with_key(api, photo(8), "forward-me-42").status_code == 200
    assert user_service.calls[-1].header("idempotency-key") == "forward-me-42"


def test_no_idempotency_key_is_forwarded_when_none_was_sent(
    api: AnalyzeActions, user_service: UserServiceServer
) -> None:
    assert api.analyze(photo(9), save=True).status_code == 200
    assert user_service.calls[-1].header("idempotency-key") is None


def test_a_save_whose_worker_died_can_be_retried_within_seconds(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    with running_gunicorn(
        redis, model, user_service, tmp_path, SINGLE_FLIGHT_LOCK_SECONDS="1"
    ) as server:
        user_service.enqueue(Reply(201, {"id": "never-seen"}, delay=30))
        headers = {**bearer(), "Idempotency-Key": "dies-mid-save"}
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(
                analyze_over_socket, server, photo(10), headers=headers, save="true"
            )
            user_service.wait_for_requests(1, timeout=10)
            for pid in server.worker_pids():
                os.kill(pid, signal.SIGKILL)
            with pytest.raises(requests.RequestException):
                first.result()
        retry = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                retry = analyze_over_socket(server, photo(10), headers=headers, save="true")
            except requests.RequestException:
                retry = None  # the master is still starting a new worker
            if retry is not None and retry.status_code != 409:
                break
            time.sleep(0.2)
        assert retry is not None
        assert retry.status_code == 200, retry.text
        assert retry.json()["analysis"]["entryId"]


# ------------------------------------------------------------------ small things


def test_a_header_over_gunicorns_limit_gets_a_json_431(served: Gunicorn) -> None:
    response = requests.get(f"{served.url}/health", headers={"X-Big": "x" * 80_000}, timeout=10)
    assert response.status_code == 431
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["code"] == "header_too_large"


def multipart(disposition: bytes, data: bytes) -> bytes:
    """A multipart body with one part of this Content-Disposition."""
    return (
        b"--XYZ\r\nContent-Disposition: form-data; "
        + disposition
        + b"\r\nContent-Type: image/jpeg\r\n\r\n"
        + data
        + b"\r\n--XYZ--\r\n"
    )


@pytest.mark.parametrize(
    ("disposition", "code", "words"),
    [
        (b'name="image"; filename="m\xe9al.jpg"', "missing_image", "UTF-8"),
        (b'name="im\xe9ge"; filename="meal.jpg"', "missing_image", "UTF-8"),
        (b'name="image"; filename="me\ral.jpg"', "missing_image", "file part"),
        (b'name="image"', "missing_image", "file part"),
    ],
)
def test_a_part_whose_names_cannot_be_read_says_why(
    client: FlaskClient,
    auth_headers: dict[str, str],
    disposition: bytes,
    code: str,
    words: str,
) -> None:
    response = client.post(
        "/analyze-food",
        data=multipart(disposition, photo(11)),
        headers={**auth_headers, "Content-Type": "multipart/form-data; boundary=XYZ"},
    )
    assert_json_error(response, 400, code)
    assert words in response.get_json()["error"]


@pytest.mark.parametrize(
    "exp", [str(int(time.time()) + 600), int("9" * 4000), 1e300], ids=["text", "huge", "float"]
)
def test_an_exp_that_is_not_a_time_is_refused(client: FlaskClient, exp: object) -> None:
    token = jwt.encode({"sub": "user-42", "exp": exp}, JWT_SECRET, algorithm="HS256")
    response = client.post("/analyze-food", headers={"Authorization": f"Bearer {token}"})
    assert_json_error(response, 401, "invalid_token")
    assert "exp" in response.get_json()["error"]


def test_a_socket_closed_by_the_client_mid_upload_leaves_the_worker_serving(
    served: Gunicorn,
) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as raw:
        raw.sendall(
            b"POST /analyze-food HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=XYZ\r\n\r\n--XYZ\r\n"
        )
    assert requests.get(f"{served.url}/health/live", timeout=5).status_code == 200
