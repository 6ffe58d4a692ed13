"""One store for all workers: the embedded file, Redis Cluster and Redis Sentinel, each for real.

The same promises in every mode: one model call per photo among concurrent requests, in any
worker or gunicorn; a cached answer for the next request; one entry per Idempotency-Key; and a
dead holder's lock taken over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests

from tests import images
from tests.conftest import REDIS_PASSWORD, analyze_over_socket, bearer, running_gunicorn
from tests.fakes import ChatCompletionsServer, RedisServer, Reply, UserServiceServer
from tests.redis_topologies import RedisCluster, RedisSentinelSet
from tests.servers import Gunicorn

PHOTO = images.jpeg(320, 240, color=(30, 160, 90))


def slow_answer(model: ChatCompletionsServer, delay: float) -> Reply:
    """The default analysis, answered after ``delay`` seconds."""
    return dataclasses.replace(model.completion(json.dumps(model.analysis)), delay=delay)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of three masters on free loopback ports."""
    with RedisCluster(password=REDIS_PASSWORD) as topology:
        yield topology


@pytest.fixture(scope="module")
def sentinels() -> Iterator[RedisSentinelSet]:
    """A master, a replica and a Sentinel watching them."""
    with RedisSentinelSet(password=REDIS_PASSWORD) as topology:
        yield topology


@pytest.fixture(params=["embedded", "redis", "redis-cluster", "redis-sentinel"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str | None]:
    """The service's settings for one kind of store, empty of anything an earlier test left."""
    kind = request.param
    if kind == "embedded":
        return {"STORE_PATH": str(tmp_path / "shared-store.sqlite3")}
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        return {
            "REDIS_HOST": server.host,
            "REDIS_PORT": str(server.port),
            "REDIS_PASSWORD": REDIS_PASSWORD,
        }
    if kind == "redis-cluster":
        topology: RedisCluster | RedisSentinelSet = request.getfixturevalue("cluster")
        topology.flush()
        return {"REDIS_URL": topology.url, "REDIS_CLUSTER": "true"}
    topology = request.getfixturevalue("sentinels")
    topology.flush()
    return {"REDIS_URL": topology.url, "REDIS_PASSWORD": REDIS_PASSWORD}


def gunicorns(
    stack: ExitStack,
    count: int,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
    **settings: str | None,
) -> list[Gunicorn]:
    """``count`` gunicorns on one host, sharing the store the settings name."""
    servers = []
    for number in range(count):
        folder = tmp_path / f"gunicorn-{number}"
        folder.mkdir()
        servers.append(
            stack.enter_context(running_gunicorn(None, model, user_service, folder, **settings))  # type: ignore[arg-type]
        )
    return servers


def test_each_store_is_named_in_health(
    store_settings: dict[str, str | None],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    with ExitStack() as stack:
        [server] = gunicorns(stack, 1, model, user_service, tmp_path, **store_settings)
        checks = requests.get(f"{server.url}/health", timeout=5).json()["checks"]
    if "REDIS_CLUSTER" in store_settings:
        assert (checks["store"], checks["redis"]) == ("redis-cluster", "connected")
    elif "REDIS_HOST" in store_settings:
        assert (checks["store"], checks["redis"]) == ("redis", "connected")
    elif "REDIS_URL" in store_settings:
        assert (checks["store"], checks["redis"]) == ("redis-sentinel", "connected")
    else:
        assert checks["store"] == "embedded"
        assert checks["redis"] == "not configured"


def test_the_next_upload_is_a_cache_hit_in_every_worker(
    store_settings: dict[str, str | None],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    with ExitStack() as stack:
        [server] = gunicorns(
            stack, 1, model, user_service, tmp_path, GUNICORN_WORKERS="2", **store_settings
        )
        sources = []
        for _ in range(8):
            server.session = requests.Session()  # a new connection, to any worker
            sources.append(analyze_over_socket(server, PHOTO).json()["source"])
    assert sources == ["api"] + ["cache"] * 7
    assert len(model.calls) == 1


def test_twenty_uploads_over_two_gunicorns_make_one_model_call(
    store_settings: dict[str, str | None],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    model.enqueue(slow_answer(model, 1.0))
    settings = {"GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "8", **store_settings}
    with ExitStack() as stack:
        first, second = gunicorns(stack, 2, model, user_service, tmp_path, **settings)
        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(
                pool.map(
                    lambda server: requests.post(
                        f"{server.url}/analyze-food",
                        files={"image": ("meal.jpg", PHOTO, "image/jpeg")},
                        headers=bearer(),
                        timeout=30,
                    ),
                    [first, second] * 10,
                )
            )
    assert [response.status_code for response in responses] == [200] * 20
    assert len(model.calls) == 1
    assert sorted(response.json()["source"] for response in responses) == ["api"] + ["cache"] * 19


def test_four_saves_with_one_key_over_two_workers_make_one_entry(
    store_settings: dict[str, str | None],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    headers = {**bearer(), "Idempotency-Key": "one-meal-7"}
    with ExitStack() as stack:
        [server] = gunicorns(
            stack, 1, model, user_service, tmp_path, GUNICORN_WORKERS="2", **store_settings
        )
        answers = []
        for _ in range(4):
            server.session = requests.Session()
            answers.append(analyze_over_socket(server, PHOTO, headers=headers, save="true"))
    assert [answer.status_code for answer in answers] == [200] * 4
    assert len({answer.json()["analysis"]["entryId"] for answer in answers}) == 1
    assert [answer.headers.get("Idempotent-Replayed") for answer in answers[1:]] == ["true"] * 3
    assert len(user_service.entries) == 1


def test_a_holder_killed_mid_call_is_taken_over(
    store_settings: dict[str, str | None],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    model.enqueue(slow_answer(model, 30.0), slow_answer(model, 0.2))
    settings = {"SINGLE_FLIGHT_LOCK_SECONDS": "1", "OPENAI_API_TIMEOUT": "60", **store_settings}
    with ExitStack() as stack:
        holder, waiter = gunicorns(stack, 2, model, user_service, tmp_path, **settings)
        with ThreadPoolExecutor(max_workers=2) as pool:
            lost = pool.submit(analyze_over_socket, holder, PHOTO)
            model.wait_for_requests(1, timeout=10)
            waiting = pool.submit(analyze_over_socket, waiter, PHOTO)
            time.sleep(0.3)
            for pid in holder.worker_pids():
                os.kill(pid, signal.SIGKILL)
            response = waiting.result(timeout=30)
            assert lost.exception(timeout=30) is not None or lost.result().status_code >= 500
    assert response.status_code == 200
    assert response.json()["source"] == "api"
    assert len(model.calls) == 2


def test_the_service_carries_on_through_a_sentinel_failover(
    sentinels: RedisSentinelSet,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    sentinels.flush()
    settings = {
        "REDIS_URL": sentinels.url,
        "REDIS_PASSWORD": REDIS_PASSWORD,
        "REDIS_BREAKER_COOLDOWN": "0.2",
    }
    statuses = []
    with ExitStack() as stack:
        [server] = gunicorns(stack, 1, model, user_service, tmp_path, **settings)
        for shade in range(3):
            statuses.append(analyze_over_socket(server, images.jpeg(48, 32, color=(shade, 7, 7))))
        sentinels.stop_master()
        deadline = time.monotonic() + 20
        shade = 3
        failed_over = False
        while time.monotonic() < deadline:
            statuses.append(analyze_over_socket(server, images.jpeg(48, 32, color=(shade, 7, 7))))
            shade += 1
            if not failed_over:
                try:
                    sentinels.wait_for_failover(timeout=0.3)
                    failed_over = True
                except TimeoutError:
                    continue
            health = requests.get(f"{server.url}/health", timeout=5).json()
            if health["checks"]["redis"] == "connected":
                break
        after = [analyze_over_socket(server, PHOTO) for _ in range(2)]
    assert [response.status_code for response in statuses + after] == [200] * (len(statuses) + 2)
    assert failed_over
    assert [response.json()["source"] for response in after] == ["api", "cache"]


def test_expired_records_are_dropped_as_the_table_is_written(tmp_path: Path) -> None:
    from app import EXPIRE_EVERY, EmbeddedStore

    store = EmbeddedStore(tmp_path / "store.sqlite3", "records")
    for number in range(EXPIRE_EVERY - 1):
        store.set(f"gone-{number}", "x" * 100, 0.001)
    time.sleep(0.01)
    store.set("kept", "y", 60)
    rows = store.connection().execute("SELECT count(*) FROM records").fetchone()[0]
    assert rows == 1
    assert store.get("kept") == "y"
