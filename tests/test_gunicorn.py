"""The real `gunicorn app:app`, configured by gunicorn.conf.py, served over a real socket."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
import requests

from tests import images
from tests.conftest import JWT_SECRET, OPENAI_API_KEY, REDIS_PASSWORD, base_environment
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer, free_port

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 20.0  # seconds until /health/live answers; a cold import takes about one
SHUTDOWN_TIMEOUT = 15.0  # seconds after SIGTERM; our connections are closed first, so no drain
REQUEST_TIMEOUT = 10.0
SECRETS = {
    "OPENAI_API_KEY": OPENAI_API_KEY,
    "JWT_SECRET": JWT_SECRET,
    "REDIS_PASSWORD": REDIS_PASSWORD,
}
# What the child may inherit: enough to run Python, nothing the service itself reads. HOME is
# the run's own folder, where gunicorn puts its control socket (~/.gunicorn/gunicorn.ctl).
INHERITED_VARIABLES = ("PATH", "LANG", "LC_ALL", "TMPDIR")


@dataclass
class Gunicorn:
    """One running gunicorn: where it answers, and the file that receives its output."""

    process: subprocess.Popen[bytes]
    url: str
    output_path: Path
    session: requests.Session = field(default_factory=requests.Session)

    def output(self) -> str:
        """Everything gunicorn, its worker and the service printed so far."""
        return self.output_path.read_text(errors="replace")


def gunicorn_environment(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    workdir: Path,
    port: int,
    overrides: Mapping[str, str | None],
) -> dict[str, str]:
    """The environment of a gunicorn serving the tests' collaborators on 127.0.0.1:port.

    ``overrides`` replace variables; a None value removes one, leaving gunicorn.conf.py's default.
    """
    secrets_dir = workdir / "no-secrets"
    metrics_dir = workdir / "metrics"
    secrets_dir.mkdir()
    metrics_dir.mkdir()
    inherited = {name: os.environ[name] for name in INHERITED_VARIABLES if name in os.environ}
    env = {
        **inherited,
        **base_environment(redis, model, user_service),
        "HOME": str(workdir),
        "SECRETS_DIR": str(secrets_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "GUNICORN_WORKERS": "1",
        "GUNICORN_THREADS": "4",
        "PYTHONUNBUFFERED": "1",
    }
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def wait_until_live(server: Gunicorn) -> None:
    """Poll /health/live until it answers 200; fail with gunicorn's output if it never does."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"gunicorn exited with {server.process.returncode}:\n{server.output()}")
        try:
            if requests.get(f"{server.url}/health/live", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or its worker is still importing the app
        time.sleep(0.05)
    pytest.fail(f"gunicorn did not answer within {STARTUP_TIMEOUT} s:\n{server.output()}")


def stop(server: Gunicorn) -> int:
    """SIGTERM gunicorn and return its exit code; kill it if it outlives SHUTDOWN_TIMEOUT."""
    server.session.close()
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        raise


@contextmanager
def running_gunicorn(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    workdir: Path,
    **overrides: str | None,
) -> Iterator[Gunicorn]:
    """Start `gunicorn app:app` from the repository root; it never outlives the block."""
    port = free_port()
    env = gunicorn_environment(redis, model, user_service, workdir, port, overrides)
    output_path = workdir / "gunicorn.log"
    with open(output_path, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "app:app"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    server = Gunicorn(process=process, url=f"http://127.0.0.1:{port}", output_path=output_path)
    try:
        wait_until_live(server)
        yield server
    finally:
        server.session.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def bearer(user_id: str = "user-42") -> dict[str, str]:
    """An Authorization header with a fresh access token signed with the tests' secret."""
    now = int(time.time())
    claims = {"sub": user_id, "type": "access", "iat": now, "exp": now + 600}
    return {"Authorization": f"Bearer {jwt.encode(claims, JWT_SECRET, algorithm='HS256')}"}


def analyze(
    server: Gunicorn, photo: bytes, *, headers: dict[str, str] | None = None, **params: str
) -> requests.Response:
    """POST a photo to /analyze-food over the socket."""
    return server.session.post(
        f"{server.url}/analyze-food",
        params=params,
        files={"image": ("meal.jpg", photo, "image/jpeg")},
        headers=bearer() if headers is None else headers,
        timeout=REQUEST_TIMEOUT,
    )


def fresh_redis(redis_server: RedisServer) -> RedisServer:
    """The tests' Redis, running and empty (what the function-scoped `redis` fixture does)."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flush()
    return redis_server


@pytest.fixture(scope="module")
def served(
    redis_server: RedisServer,
    model_server: ChatCompletionsServer,
    user_service_server: UserServiceServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gunicorn]:
    """One gunicorn for the module's request tests; each test resets what it looks at."""
    workdir = tmp_path_factory.mktemp("gunicorn-served")
    with running_gunicorn(redis_server, model_server, user_service_server, workdir) as server:
        yield server


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
        returncode = stop(server)
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
