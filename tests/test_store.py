"""One store for all workers: the embedded file, Redis Cluster and Redis Sentinel, each for real.

The same promises in every mode: one model call per photo among concurrent requests, in any
worker or gunicorn; a cached answer for the next request; one entry per Idempotency-Key; and a
dead holder's lock taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis as redis_py
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

from store import (
    CircuitBreaker,
    EmbeddedStore,
    RedisSettings,
    RedisStore,
    RequestScope,
    SentinelURL,
    Store,
    StoreUnavailable,
    build_stores,
    no_request,
    parse_sentinel_url,
)
from tests import images
from tests.conftest import (
    REDIS_PASSWORD,
    analyze_over_socket,
    base_environment,
    bearer,
    running_gunicorn,
    slow_answer,
)
from tests.fakes import (
    ChatCompletionsServer,
    RedisServer,
    UserServiceServer,
    free_port,
)
from tests.redis_topologies import RedisCluster, RedisSentinelSet
from tests.servers import STARTUP_TIMEOUT, Gunicorn, start_gunicorn

PHOTO = images.jpeg(320, 240, color=(30, 160, 90))


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
    from store import EXPIRE_EVERY, EmbeddedStore

    store = EmbeddedStore(tmp_path / "store.sqlite3", "records")
    for number in range(EXPIRE_EVERY - 1):
        store.set(f"gone-{number}", "x" * 100, -1)  # expired a second ago
    store.set("kept", "y", 60)
    rows = store.connection().execute("SELECT count(*) FROM records").fetchone()[0]
    assert rows == 1
    assert store.get("kept") == "y"


# ------------------------------------------------------------------ the embedded file, attacked


def two_workers(
    stack: ExitStack,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
    store_path: Path,
) -> Gunicorn:
    """One gunicorn with two workers on the embedded store at ``store_path``."""
    [server] = gunicorns(
        stack,
        1,
        model,
        user_service,
        tmp_path,
        GUNICORN_WORKERS="2",
        GUNICORN_THREADS="16",
        STORE_PATH=str(store_path),
    )
    return server


def store_checks(server: Gunicorn, times: int = 6) -> set[str]:
    """What /health's checks.store said over new connections, so both workers answer."""
    return {
        requests.get(f"{server.url}/health", timeout=5).json()["checks"]["store"]
        for _ in range(times)
    }


def saves_with_one_key(server: Gunicorn, key: str, photo: bytes, count: int) -> list[int]:
    """The statuses of ``count`` saves of one photo with one Idempotency-Key, one at a time."""
    headers = {**bearer(), "Idempotency-Key": key}
    statuses = []
    for _ in range(count):
        server.session = requests.Session()  # a new connection, to any worker
        statuses.append(
            analyze_over_socket(server, photo, headers=headers, save="true").status_code
        )
    return statuses


def uploads_at_once(server: Gunicorn, photo: bytes, count: int) -> list[int]:
    """The statuses of ``count`` simultaneous uploads of one photo."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        responses = list(
            pool.map(
                lambda _: requests.post(
                    f"{server.url}/analyze-food",
                    files={"image": ("meal.jpg", photo, "image/jpeg")},
                    headers=bearer(),
                    timeout=30,
                ),
                range(count),
            )
        )
    return [response.status_code for response in responses]


def delete_file(path: Path) -> None:
    """Remove the store's file, as a careless operator's ``rm`` would (its log stays)."""
    path.unlink()


def truncate_file(path: Path) -> None:
    """Cut the store's file to nothing, in place."""
    with open(path, "r+b") as file:
        file.truncate(0)


@pytest.mark.parametrize("damage", [delete_file, truncate_file], ids=["deleted", "truncated"])
def test_a_store_file_deleted_or_truncated_while_two_workers_run_is_made_afresh(
    damage: Callable[[Path], None],
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "state" / "store.sqlite3"
    with ExitStack() as stack:
        server = two_workers(stack, model, user_service, tmp_path, store_path)
        assert saves_with_one_key(server, "before", PHOTO, 4) == [200] * 4
        assert uploads_at_once(server, images.jpeg(40, 40, color=(1, 2, 3)), 8) == [200] * 8
        damage(store_path)
        entries_before, calls_before = len(user_service.entries), len(model.calls)
        statuses = saves_with_one_key(server, "after", images.jpeg(50, 30), 3)
        entries = len(user_service.entries) - entries_before
        model.enqueue(slow_answer(model, 1.0))
        calls_before = len(model.calls)
        uploads = uploads_at_once(server, images.jpeg(30, 50, color=(9, 9, 9)), 20)
        checks = store_checks(server)
    assert statuses == [200] * 3
    assert entries == 1
    assert uploads == [200] * 20
    assert len(model.calls) - calls_before <= 2
    assert checks == {"embedded"}
    assert store_path.stat().st_size > 0


def test_health_says_the_store_is_degraded_until_it_can_be_opened_again(
    model: ChatCompletionsServer, user_service: UserServiceServer, tmp_path: Path
) -> None:
    folder = tmp_path / "state"
    key_headers = {**bearer(), "Idempotency-Key": "while-degraded"}
    with ExitStack() as stack:
        server = two_workers(stack, model, user_service, tmp_path, folder / "store.sqlite3")
        healthy = store_checks(server)
        shutil.rmtree(folder)
        folder.write_text("not a folder")
        degraded = store_checks(server)
        upload = analyze_over_socket(server, images.jpeg(24, 24))
        unguarded_save = analyze_over_socket(server, PHOTO, save="true")
        guarded_save = analyze_over_socket(server, PHOTO, headers=key_headers, save="true")
        folder.unlink()
        recovered = store_checks(server)
        saves = saves_with_one_key(server, "after-recovery", PHOTO, 2)
    assert healthy == {"embedded"}
    assert degraded == {"embedded, degraded: the folder that should hold it is not a folder"}
    assert (upload.status_code, upload.json()["source"]) == (200, "api")
    assert unguarded_save.status_code == 200
    assert guarded_save.status_code == 503
    assert guarded_save.json()["code"] == "store_unavailable"
    assert guarded_save.headers["Retry-After"] == "1"
    assert recovered == {"embedded"}
    assert saves == [200, 200]
    assert len(user_service.entries) == 2  # the unguarded save and the one with a key


def file_modes(store_path: Path) -> dict[str, str]:
    """The permission bits of the store's folder, file, log and index."""
    paths = {
        "folder": store_path.parent,
        "file": store_path,
        "wal": Path(f"{store_path}-wal"),
        "shm": Path(f"{store_path}-shm"),
    }
    return {name: oct(stat.S_IMODE(path.stat().st_mode)) for name, path in paths.items()}


def test_a_store_the_service_makes_is_private_to_its_user(
    model: ChatCompletionsServer, user_service: UserServiceServer, tmp_path: Path
) -> None:
    store_path = tmp_path / "state" / "deeper" / "store.sqlite3"
    with ExitStack() as stack:
        server = two_workers(stack, model, user_service, tmp_path, store_path)
        assert analyze_over_socket(server, PHOTO).status_code == 200
        modes = file_modes(store_path)
        parent = oct(stat.S_IMODE(store_path.parent.parent.stat().st_mode))
    assert modes == {"folder": "0o700", "file": "0o600", "wal": "0o600", "shm": "0o600"}
    assert parent == "0o700"


def test_an_older_store_left_readable_by_others_is_tightened(
    model: ChatCompletionsServer, user_service: UserServiceServer, tmp_path: Path
) -> None:
    folder = tmp_path / "older"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    store_path = folder / "store.sqlite3"
    with sqlite3.connect(store_path) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
    store_path.chmod(0o644)
    with ExitStack() as stack:
        server = two_workers(stack, model, user_service, tmp_path, store_path)
        assert analyze_over_socket(server, PHOTO).status_code == 200
        modes = file_modes(store_path)
    assert modes == {"folder": "0o700", "file": "0o600", "wal": "0o600", "shm": "0o600"}


def plant_open_folder(store_path: Path) -> None:
    """A folder every user may write, made before the service starts."""
    store_path.parent.mkdir()
    store_path.parent.chmod(0o777)


def plant_open_file(store_path: Path) -> None:
    """A file every user may write, in a folder of the service's own."""
    store_path.parent.mkdir(mode=0o700)
    store_path.write_bytes(b"")
    store_path.chmod(0o666)


def plant_foreign_file(store_path: Path) -> None:
    """A private file owned by another user (nobody)."""
    store_path.parent.mkdir(mode=0o700)
    store_path.write_bytes(b"")
    store_path.chmod(0o600)
    os.chown(store_path, NOBODY, NOBODY)


def plant_symlink(store_path: Path) -> None:
    """A symbolic link to another private file."""
    store_path.parent.mkdir(mode=0o700)
    target = store_path.parent / "someone-elses.db"
    target.write_bytes(b"")
    target.chmod(0o600)
    store_path.symlink_to(target)


def plant_folder(store_path: Path) -> None:
    """A folder where the file should be."""
    store_path.mkdir(parents=True, mode=0o700)


NOBODY = 65534


@pytest.mark.parametrize(
    ("plant", "problem"),
    [
        (plant_open_folder, "the folder is writable by every user (mode 0777)"),
        (plant_open_file, "the path is writable by every user (mode 0666)"),
        (plant_foreign_file, f"the path is owned by uid {NOBODY}, not the service's uid"),
        (plant_symlink, "the path is a symbolic link"),
        (plant_folder, "the path is a folder, not a file"),
    ],
    ids=["open-folder", "open-file", "foreign-file", "symlink", "folder"],
)
def test_a_store_that_is_not_the_services_own_stops_the_start(
    plant: Callable[[Path], None],
    problem: str,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "planted" / "store.sqlite3"
    plant(store_path)
    code, output = refused_start(model, user_service, tmp_path, store_path)
    assert code == 1
    assert len(output.splitlines()) == 1, output
    assert output.startswith(f"image-service: invalid configuration: STORE_PATH {store_path}: ")
    assert problem in output
    if plant is plant_symlink:
        assert (store_path.parent / "someone-elses.db").stat().st_size == 0


def test_a_store_path_under_proc_stops_the_start(
    model: ChatCompletionsServer, user_service: UserServiceServer, tmp_path: Path
) -> None:
    store_path = Path("/proc/image-service/store.sqlite3")
    code, output = refused_start(model, user_service, tmp_path, store_path)
    assert code == 1
    assert len(output.splitlines()) == 1, output
    assert f"STORE_PATH {store_path}: " in output


def refused_start(
    model: ChatCompletionsServer, user_service: UserServiceServer, tmp_path: Path, store_path: Path
) -> tuple[int, str]:
    """gunicorn's exit code and output when it is started on this store and stops by itself."""
    settings = {**base_environment(None, model, user_service), "STORE_PATH": str(store_path)}
    server = start_gunicorn("app:app", tmp_path / "refused", settings)
    try:
        code = server.process.wait(timeout=STARTUP_TIMEOUT)
    finally:
        server.kill()
    return code, server.output().strip()


# ------------------------------------------------------------------ what is read back


def plant_in_every_row(store_path: Path, table: str, value: str) -> int:
    """Overwrite every row of a table with ``value``, as another user with write access could."""
    with sqlite3.connect(store_path) as connection:
        return connection.execute(f"UPDATE {table} SET value = ?", (value,)).rowcount


PLANTED_ANALYSES = {
    "missing-calories": {
        "name": "Salmon",
        "protein": 40,
        "carbs": 10,
        "fat": 25,
        "servingSize": "1 fillet",
        "ingredients": [],
        "confidence": 0.9,
        "items": [],
    },
    "poisoned": {
        "name": "POISONED <img src=x onerror=alert(1)>",
        "calories": -999,
        "protein": 40,
        "carbs": 10,
        "fat": 25,
        "servingSize": "1 fillet",
        "ingredients": [],
        "confidence": 0.9,
        "items": [],
    },
    "not-an-object": [1, 2, 3],
    "overlong-name": {
        "name": "x" * 10_000,
        "calories": 450,
        "protein": 40,
        "carbs": 10,
        "fat": 25,
        "servingSize": "1 fillet",
        "ingredients": [],
        "confidence": 0.9,
        "items": [],
    },
}


@pytest.mark.parametrize("planted", list(PLANTED_ANALYSES), ids=list(PLANTED_ANALYSES))
@pytest.mark.parametrize("save", ["false", "true"])
def test_a_planted_cache_entry_is_a_miss_answered_by_the_model(
    planted: str,
    save: str,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "state" / "store.sqlite3"
    with ExitStack() as stack:
        [server] = gunicorns(stack, 1, model, user_service, tmp_path, STORE_PATH=str(store_path))
        assert analyze_over_socket(server, PHOTO).json()["source"] == "api"
        assert plant_in_every_row(store_path, "analyses", json.dumps(PLANTED_ANALYSES[planted]))
        planted_answer = analyze_over_socket(server, PHOTO, save=save)
        next_answer = analyze_over_socket(server, PHOTO, save=save)
    assert planted_answer.status_code == 200, planted_answer.text
    assert planted_answer.json()["source"] == "api"
    assert planted_answer.json()["analysis"]["name"] == model.analysis["name"]
    assert (next_answer.status_code, next_answer.json()["source"]) == (200, "cache")
    assert len(model.calls) == 2


def test_a_planted_idempotency_record_is_dropped_not_replayed(
    model: ChatCompletionsServer, user_service: UserServiceServer, tmp_path: Path
) -> None:
    store_path = tmp_path / "state" / "store.sqlite3"
    planted = {"state": "done", "digest": "x", "response": {"analysis": {"name": "POISONED"}}}
    with ExitStack() as stack:
        [server] = gunicorns(stack, 1, model, user_service, tmp_path, STORE_PATH=str(store_path))
        assert saves_with_one_key(server, "planted", PHOTO, 1) == [200]
        with sqlite3.connect(store_path) as connection:
            connection.execute(
                "UPDATE records SET value = ? WHERE key LIKE 'idempotency:%'",
                (json.dumps(planted),),
            )
        retry = analyze_over_socket(
            server, PHOTO, headers={**bearer(), "Idempotency-Key": "planted"}, save="true"
        )
    assert retry.status_code == 200
    assert retry.json()["analysis"]["name"] == model.analysis["name"]
    assert "Idempotent-Replayed" not in retry.headers


def test_a_planted_lock_that_never_expires_is_taken_over(
    model: ChatCompletionsServer, user_service: UserServiceServer, tmp_path: Path
) -> None:
    store_path = tmp_path / "state" / "store.sqlite3"
    photo = images.jpeg(36, 36, color=(5, 50, 150))
    settings = {"STORE_PATH": str(store_path), "SINGLE_FLIGHT_LOCK_SECONDS": "1"}
    with ExitStack() as stack:
        [server] = gunicorns(stack, 1, model, user_service, tmp_path, **settings)
        assert analyze_over_socket(server, photo).status_code == 200
        with sqlite3.connect(store_path) as connection:
            planted = connection.execute(
                "INSERT INTO records SELECT 'lock:' || key, ?, 1e12, 0, 0 FROM analyses",
                ("0" * 32,),
            ).rowcount
            connection.execute("DELETE FROM analyses")
        answer = analyze_over_socket(server, photo)
    assert planted == 1
    assert (answer.status_code, answer.json()["source"]) == (200, "api")


def test_store_max_mb_bounds_the_files_on_disk_log_included(tmp_path: Path) -> None:
    from app import AnalysisCache
    from store import EmbeddedStore, wal_pages_for

    bound = 1024 * 1024
    folder = tmp_path / "bounded"
    store = EmbeddedStore(folder / "store.sqlite3", "analyses", bound, wal_pages_for(bound))
    cache = AnalysisCache(store, ttl_seconds=3600)
    entry = {"name": "meal", "assumptions": ["x" * 190] * 10}
    peak = 0
    for number in range(2500):  # about six times the bound
        cache.set(f"food_analysis:{number:064d}", entry)
        peak = max(peak, sum(path.stat().st_size for path in folder.iterdir()))
    assert peak <= bound * 1.3
    assert cache.get(f"food_analysis:{2499:064d}") == entry


def test_a_store_file_overwritten_with_garbage_is_made_afresh(tmp_path: Path) -> None:
    from store import EmbeddedStore

    store_path = tmp_path / "state" / "store.sqlite3"
    worker = EmbeddedStore(store_path, "records")
    worker.set("kept", "before", 60)
    worker.run("checkpoint").fetchall()
    with open(store_path, "r+b") as file:
        file.write(b"not a database at all " * 500)
    other_worker = EmbeddedStore(store_path, "records")
    assert other_worker.get("kept") is None
    assert worker.add("kept", "after", 60)
    assert other_worker.get("kept") == "after"
    assert worker.describe() == other_worker.describe() == "embedded"


def test_a_store_file_replaced_by_another_database_gets_its_tables(tmp_path: Path) -> None:
    from store import EmbeddedStore

    store_path = tmp_path / "state" / "store.sqlite3"
    store = EmbeddedStore(store_path, "records")
    store.set("kept", "before", 60)
    store.run("checkpoint").fetchall()
    replacement = tmp_path / "state" / "replacement.sqlite3"
    with sqlite3.connect(replacement) as connection:
        connection.execute("CREATE TABLE unrelated (x)")
    replacement.chmod(0o600)
    replacement.replace(store_path)
    assert store.get("kept") is None
    assert store.add("kept", "after", 60)
    assert store.get("kept") == "after"


def test_a_redis_lock_planted_without_expiry_is_dropped_when_read_as_a_lock(
    redis: RedisServer, make_config: Callable[..., object]
) -> None:
    from app import Config, redis_settings
    from store import build_stores

    config = make_config()
    assert isinstance(config, Config)
    _, records = build_stores(redis_settings(config), config.store_file, 1024 * 1024)
    with redis.client() as connection:
        connection.set("lock:planted", "0" * 32)
        connection.set("idempotency:kept", "a record", px=60_000)
    assert records.get("lock:planted", 1.0) is None
    assert records.add("lock:planted", "1" * 32, 1.0, 1.0)
    assert records.get("lock:planted", 1.0) == "1" * 32
    assert records.get("idempotency:kept") == "a record"


def test_a_folder_shared_with_other_files_keeps_its_mode(tmp_path: Path) -> None:
    from store import EmbeddedStore

    folder = tmp_path / "home"
    folder.mkdir()
    folder.chmod(0o755)
    (folder / "notes.txt").write_text("someone else's")
    store = EmbeddedStore(folder / "store.sqlite3", "records")
    store.set("key", "value", 60)
    assert oct(stat.S_IMODE(folder.stat().st_mode)) == "0o755"
    assert oct(stat.S_IMODE((folder / "store.sqlite3").stat().st_mode)) == "0o600"


# ------------------------------------------------------------------ one request, one Redis failure


def redis_at_a_closed_port(
    scope: Callable[[], RequestScope | None], events: list[str]
) -> RedisStore:
    """A RedisStore whose server is gone, behind a breaker that never opens here."""
    client = redis_py.Redis(
        port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    return RedisStore(client, CircuitBreaker(1000, 60), scope=scope, count=events.append)


def test_a_request_that_saw_redis_fail_does_not_ask_it_again() -> None:
    scope, events = RequestScope(), []
    store = redis_at_a_closed_port(lambda: scope, events)

    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            store.get("key")

    assert scope.redis_failed
    assert events == ["error", "skipped", "skipped"]


def test_outside_a_request_every_call_asks_redis() -> None:
    events: list[str] = []
    store = redis_at_a_closed_port(no_request, events)

    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            store.get("key")

    assert events == ["error", "error"]


# ------------------------------------------------------------------ counters (a shared rate budget)


@pytest.fixture(params=["embedded", "redis", "redis-cluster"])
def counting_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The store the service builds for its cache, in each mode, empty."""
    kind = request.param
    settings: RedisSettings | None = None
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        settings = RedisSettings(server.url, 2.0, 3, 15.0, password=REDIS_PASSWORD)
    elif kind == "redis-cluster":
        topology: RedisCluster = request.getfixturevalue("cluster")
        topology.flush()
        settings = RedisSettings(topology.url, 2.0, 3, 15.0, cluster=True)
    store, _ = build_stores(settings, tmp_path / "store.sqlite3", 1024 * 1024)
    yield store
    if isinstance(store, RedisStore):
        store.client.close()


def test_a_counter_counts_up_from_one_key_by_key(counting_store: Store) -> None:
    assert [counting_store.count("budget:1", 60) for _ in range(3)] == [1, 2, 3]
    assert counting_store.count("budget:2", 60) == 1
    assert counting_store.count("budget:1", 60) == 4


def test_a_counter_starts_again_once_its_window_has_passed(counting_store: Store) -> None:
    assert counting_store.count("budget:window", 0.3) == 1
    assert counting_store.count("budget:window", 0.3) == 2
    time.sleep(0.5)
    assert counting_store.count("budget:window", 0.3) == 1


def test_counting_does_not_stretch_the_window(counting_store: Store) -> None:
    counting_store.count("budget:fixed", 0.5)
    time.sleep(0.3)
    assert counting_store.count("budget:fixed", 60) == 2  # the window keeps its first expiry
    time.sleep(0.4)
    assert counting_store.count("budget:fixed", 60) == 1


def test_concurrent_counts_are_each_counted_once(counting_store: Store) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        counts = list(pool.map(lambda _: counting_store.count("budget:busy", 60), range(40)))
    assert sorted(counts) == list(range(1, 41))


def test_a_redis_counter_gets_its_ttl_when_made(redis: RedisServer) -> None:
    store, _ = build_stores(
        RedisSettings(redis.url, 2.0, 3, 15.0, password=REDIS_PASSWORD), Path("unused"), 1
    )
    store.count("budget:ttl", 60)
    store.count("budget:ttl", 60)
    with redis.client() as connection:
        assert connection.get("budget:ttl") == b"2"
        assert 0 < connection.pttl("budget:ttl") <= 60_000
        connection.set("budget:forever", "5")  # one left without expiry gets one on its next count
    assert store.count("budget:forever", 60) == 6
    with redis.client() as connection:
        assert 0 < connection.pttl("budget:forever") <= 60_000


def test_counting_in_an_unreachable_redis_raises_store_unavailable() -> None:
    events: list[str] = []
    store = redis_at_a_closed_port(no_request, events)
    with pytest.raises(StoreUnavailable):
        store.count("budget:1", 60)
    assert events == ["error"]


def test_counting_in_an_unusable_embedded_file_raises_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("a file where the store's folder should be")
    store = EmbeddedStore(tmp_path / "not-a-folder" / "store.sqlite3", "analyses")
    with pytest.raises(StoreUnavailable):
        store.count("budget:1", 60)


def test_an_embedded_counter_over_a_planted_value_counts_from_it(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "store.sqlite3", "analyses")
    store.set("budget:planted", "not a number", 60)
    assert store.count("budget:planted", 60) == 1


# ------------------------------------------------------------------ the Sentinel URL, read once


def test_a_sentinel_url_names_its_sentinels_service_database_and_password() -> None:
    address = parse_sentinel_url("redis+sentinel://:secret@s1:26380,s2:26381/mymaster/2")

    assert address == SentinelURL(
        hosts=(("s1", 26380), ("s2", 26381)), service="mymaster", db=2, password="secret"
    )


def test_a_sentinel_without_a_port_is_asked_on_sentinels_own() -> None:
    address = parse_sentinel_url("redis+sentinel://s1,s2:26380/mymaster")

    assert (address.hosts, address.db, address.password) == (
        (("s1", 26379), ("s2", 26380)),
        0,
        None,
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h1:abc/mymaster",
        "redis+sentinel://h1:26379/mymaster/x",
        "redis+sentinel://h1:26379",
    ],
)
def test_a_sentinel_url_without_a_service_or_a_port_number_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="REDIS_URL"):
        parse_sentinel_url(url)


# ------------------------------------------------------------------ the breaker, alone


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_breaker_stays_closed_below_its_threshold() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=60, clock=Clock())

    opened = [breaker.failed(), breaker.failed()]

    assert opened == [False, False]
    assert breaker.allows()


def test_breaker_opens_at_its_threshold() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=60, clock=Clock())

    opened = [breaker.failed() for _ in range(3)]

    assert opened == [False, False, True]
    assert not breaker.allows()


def test_success_resets_the_count_of_consecutive_failures() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=60, clock=Clock())
    breaker.failed()
    breaker.succeeded()

    assert breaker.failed() is False
    assert breaker.allows()


def test_breaker_stays_open_until_the_cool_off_has_passed() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=60, clock=clock)
    breaker.failed()
    clock.advance(59.9)

    assert not breaker.allows()


def test_breaker_allows_a_trial_once_the_cool_off_has_passed() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=60, clock=clock)
    breaker.failed()
    clock.advance(60)

    assert breaker.allows()


def test_failed_trial_after_the_cool_off_reopens_the_breaker() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=2, cooldown=60, clock=clock)
    breaker.failed()
    breaker.failed()
    clock.advance(60)
    assert breaker.allows()  # the trial

    reopened = breaker.failed()

    assert reopened is True
    assert not breaker.allows()


def test_successful_trial_after_the_cool_off_closes_the_breaker() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=2, cooldown=60, clock=clock)
    breaker.failed()
    breaker.failed()
    clock.advance(60)
    assert breaker.allows()  # the trial
    breaker.succeeded()

    reopened = breaker.failed()

    assert reopened is False
    assert breaker.allows()
