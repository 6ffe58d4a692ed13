"""The service as deployed: gunicorn.conf.py under a slow model, and /metrics across workers."""

from __future__ import annotations

import dataclasses
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from flask.testing import FlaskClient

from tests import images
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer
from tests.test_gunicorn import analyze, bearer, running_gunicorn

MODEL_DELAY = 2.0


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(3))
    return total


def test_sixteen_slow_model_calls_at_once_all_succeed_with_the_default_settings(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    slow = dataclasses.replace(model.completion(json.dumps(model.analysis)), delay=MODEL_DELAY)
    model.enqueue(*[slow] * 16)
    photos = [images.jpeg(320, 240, color=(10 * n, 200 - 10 * n, 90)) for n in range(16)]
    with running_gunicorn(
        redis,
        model,
        user_service,
        tmp_path,
        GUNICORN_WORKERS=None,
        GUNICORN_THREADS=None,
        OPENAI_API_TIMEOUT="10",
    ) as server:
        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(
                pool.map(
                    lambda photo: requests.post(
                        f"{server.url}/analyze-food",
                        files={"image": ("meal.jpg", photo, "image/jpeg")},
                        headers=bearer(),
                        timeout=30,
                    ),
                    photos,
                )
            )
        output = server.output()
    assert [response.status_code for response in responses] == [200] * 16
    assert {response.json()["source"] for response in responses} == {"api"}
    assert len(model.calls) == 16
    assert "WORKER TIMEOUT" not in output


def test_metrics_count_requests_cache_and_model_across_two_workers(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    photo = images.jpeg(color=(140, 70, 20))
    # No PROMETHEUS_MULTIPROC_DIR given: gunicorn.conf.py makes the folder, as in a container.
    with running_gunicorn(
        redis,
        model,
        user_service,
        tmp_path,
        GUNICORN_WORKERS="2",
        PROMETHEUS_MULTIPROC_DIR=None,
        TMPDIR=str(tmp_path),
    ) as server:
        before = requests.get(f"{server.url}/metrics", timeout=5)
        statuses = [analyze(server, photo).status_code for _ in range(6)]
        statuses.append(analyze(server, photo, save="true").status_code)
        statuses.append(analyze(server, photo, headers={}).status_code)
        after = requests.get(f"{server.url}/metrics", timeout=5)
    assert before.status_code == after.status_code == 200
    assert after.headers["Content-Type"].startswith("text/plain")
    assert statuses == [200] * 7 + [401]
    text = after.text
    assert metric_total(before.text, "image_service_requests_total", endpoint="/analyze-food") == 0
    assert metric_total(text, "image_service_requests_total", endpoint="/analyze-food") == 8
    assert (
        metric_total(text, "image_service_requests_total", endpoint="/analyze-food", status="401")
        == 1
    )
    assert metric_total(text, "image_service_cache_events_total", event="miss") == 1
    assert metric_total(text, "image_service_cache_events_total", event="hit") == 6
    assert metric_total(text, "image_service_model_requests_total", outcome="ok") == 1
    assert metric_total(text, "image_service_model_tokens_total", kind="prompt") == 900
    assert metric_total(text, "image_service_model_tokens_total", kind="completion") == 80
    assert metric_total(text, "image_service_user_service_requests_total", outcome="ok") == 1
    assert metric_total(text, "image_service_request_duration_seconds_count") >= 8
    assert metric_total(text, "image_service_model_request_duration_seconds_count") == 1


def test_metrics_need_no_token(client: FlaskClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "image_service_requests_total" in response.get_data(as_text=True)
