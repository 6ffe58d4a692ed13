"""The real `gunicorn app:app`, configured by gunicorn.conf.py, served over a real socket."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from tests import images
from tests.conftest import (
    JWT_SECRET,
    OPENAI_API_KEY,
    REDIS_PASSWORD,
    REQUEST_TIMEOUT,
    running_gunicorn,
)
from tests.conftest import analyze_over_socket as analyze
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer
from tests.servers import Gunicorn

SECRETS = {
    "OPENAI_API_KEY": OPENAI_API_KEY,
    "JWT_SECRET": JWT_SECRET,
    "REDIS_PASSWORD": REDIS_PASSWORD,
}


def fresh_redis(redis_server: RedisServer) -> RedisServer:
    """The tests' Redis, running and empty (what the function-scoped `redis` fixture does)."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flush()
    return redis_server


@dataclass(frozen=True)
class FinishedRun:
    """A gunicorn that served a typical session and was stopped with SIGTERM."""

    returncode: int
    output: str
    statuses: dict[str, int | str | None]


@pytest.fixture(scope="module")
def finished_run(
    redis_server: RedisServer,
    model_server: ChatCompletionsServer,
    user_service_server: UserServiceServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> FinishedRun:
    """Start gunicorn, serve health, a miss, a hit, a save and a 401, then SIGTERM it."""
    fresh_redis(redis_server)
    model_server.reset()
    user_service_server.reset()
    workdir = tmp_path_factory.mktemp("gunicorn-finished")
    photo = images.jpeg(color=(11, 22, 33))
    with running_gunicorn(redis_server, model_server, user_service_server, workdir) as server:
        health = server.session.get(f"{server.url}/health", timeout=REQUEST_TIMEOUT)
        statuses = {
            "health": health.status_code,
            "miss": analyze(server, photo).json().get("source"),
            "hit": analyze(server, photo).json().get("source"),
            "save": analyze(server, photo, save="true").status_code,
            "no_token": analyze(server, photo, headers={}).status_code,
        }
        returncode = server.stop()
        return FinishedRun(returncode=returncode, output=server.output(), statuses=statuses)


# ------------------------------------------------------------------ requests over the socket


def test_health_answers_healthy_over_the_socket(served: Gunicorn, redis: RedisServer) -> None:
    response = served.session.get(f"{served.url}/health", timeout=REQUEST_TIMEOUT)

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["checks"]["redis"] == "connected"
    assert body["checks"]["openai"] == "configured"


def test_first_analysis_comes_from_the_model(
    served: Gunicorn, redis: RedisServer, model: ChatCompletionsServer
) -> None:
    response = analyze(served, images.jpeg(color=(120, 60, 30)))

    assert response.status_code == 200
    assert response.json()["source"] == "api"
    assert response.json()["analysis"]["name"] == "Grilled Salmon with Asparagus"
    assert len(model.calls) == 1


def test_second_analysis_comes_from_the_cache(
    served: Gunicorn, redis: RedisServer, model: ChatCompletionsServer
) -> None:
    photo = images.jpeg(color=(30, 160, 90))
    analyze(served, photo)

    response = analyze(served, photo)

    assert response.status_code == 200
    assert response.json()["source"] == "cache"
    assert len(model.calls) == 1


def test_save_stores_the_entry_in_the_user_service(
    served: Gunicorn,
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
) -> None:
    response = analyze(served, images.jpeg(color=(200, 200, 40)), save="true")

    assert response.status_code == 200
    entry_id = response.json()["analysis"]["entryId"]
    assert [entry["id"] for entry in user_service.entries] == [entry_id]
    assert user_service.entries[0]["userId"] == "user-42"


def test_missing_token_answers_401_json(served: Gunicorn, redis: RedisServer) -> None:
    response = analyze(served, images.jpeg(), headers={})

    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["code"] == "missing_token"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


# ------------------------------------------------------------------ shutdown and output


def test_finished_run_served_the_session_it_was_given(finished_run: FinishedRun) -> None:
    assert finished_run.statuses == {
        "health": 200,
        "miss": "api",
        "hit": "cache",
        "save": 200,
        "no_token": 401,
    }


def test_sigterm_stops_gunicorn_with_exit_code_0(finished_run: FinishedRun) -> None:
    assert finished_run.returncode == 0, finished_run.output


def test_output_shows_the_cache_hit(finished_run: FinishedRun) -> None:
    assert "Cache hit" in finished_run.output


def test_output_shows_a_line_per_request(finished_run: FinishedRun) -> None:
    assert re.search(r"POST /analyze-food\S* .*\b200\b", finished_run.output)
    assert re.search(r"POST /analyze-food\S* .*\b401\b", finished_run.output)


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_output_holds_no_secret(finished_run: FinishedRun, name: str) -> None:
    assert SECRETS[name] not in finished_run.output


def test_a_path_holding_u2028_gives_one_log_line(served: Gunicorn, redis: RedisServer) -> None:
    served.session.get(
        f"{served.url}/meal%E2%80%A8INFO%20[forged]%20GET%20/health%20200",
        headers={"X-Request-ID": "unicode-line-break"},
        timeout=REQUEST_TIMEOUT,
    )

    lines = [line for line in served.output().split("\n") if "[unicode-line-break]" in line]
    assert len(lines) == 1, lines
    assert lines[0].splitlines() == [lines[0]]
