"""docker-entrypoint.sh and the stubs in tools/, each run as the real process it is."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests import images
from tests.conftest import post_photo
from tests.fakes import free_port

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker-entrypoint.sh"
STUB = ROOT / "tools" / "user_service_stub.py"
MODEL_STUB = ROOT / "tools" / "model_stub.py"
# Far above every bound the tests set (1-10 s), so a wait that is not bounded fails the test.
PROCESS_TIMEOUT = 30
SECRET_VARIABLES = {
    "redis_password": "REDIS_PASSWORD",
    "openai_api_key": "OPENAI_API_KEY",
    "jwt_secret": "JWT_SECRET",
}
# The command the entrypoint execs: records its environment and pids in the file $REPORT.
REPORT_COMMAND = (
    sys.executable,
    "-c",
    "import json, os; json.dump({'env': dict(os.environ), 'pid': os.getpid(),"
    " 'ppid': os.getppid()}, open(os.environ['REPORT'], 'w'))",
)


def secret_value(label: str) -> str:
    """A value no log line could contain by chance."""
    return f"{label}-{uuid.uuid4().hex}"


@dataclass
class EntrypointRun:
    """What one run of the entrypoint left behind."""

    returncode: int
    stdout: str
    stderr: str
    popen_pid: int
    report: dict[str, Any] | None

    @property
    def env(self) -> dict[str, str]:
        """The environment the command was started with."""
        assert self.report is not None, f"the command did not run; stderr: {self.stderr}"
        return dict(self.report["env"])


def write_secrets(folder: Path, **contents: str) -> None:
    """One file per secret, named as Docker names them."""
    for name, content in contents.items():
        (folder / name).write_text(content)


def run_entrypoint(
    secrets_dir: Path,
    env: dict[str, str] | None = None,
    *,
    shell: tuple[str, ...] = ("sh",),
    command: tuple[str, ...] = REPORT_COMMAND,
) -> EntrypointRun:
    """Run the entrypoint in a clean environment with `command` and wait for it to end."""
    report = secrets_dir.parent / f"report-{uuid.uuid4().hex}.json"
    full_env = {
        "PATH": os.environ["PATH"],
        "SECRETS_DIR": str(secrets_dir),
        "REPORT": str(report),
        **(env or {}),
    }
    with subprocess.Popen(
        [*shell, str(ENTRYPOINT), *command],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail(f"the entrypoint was still running after {PROCESS_TIMEOUT}s")
    return EntrypointRun(
        returncode=process.returncode,
        stdout=stdout,
        stderr=stderr,
        popen_pid=process.pid,
        report=json.loads(report.read_text()) if report.exists() else None,
    )


def all_secrets(folder: Path) -> dict[str, str]:
    """Write the three secret files; return the variable -> value the command should see."""
    values = {name: secret_value(name) for name in SECRET_VARIABLES}
    write_secrets(folder, **{name: f"  {value}\n\n" for name, value in values.items()})
    return {SECRET_VARIABLES[name]: value for name, value in values.items()}


# ------------------------------------------------------------------------------- a real Redis


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    """A redis-server of the tests' own on a free loopback port."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; these tests need a real one (apt redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {port}")
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


# ------------------------------------------------------------------------------------ secrets


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_secret_files_are_exported_stripped_and_win_over_variables(
    secrets_dir: Path, shell: str
) -> None:
    expected = all_secrets(secrets_dir)
    stale = dict.fromkeys(expected, "from-the-environment")

    run = run_entrypoint(secrets_dir, stale, shell=(shell,))

    assert run.returncode == 0, run.stderr
    for variable, value in expected.items():
        assert run.env[variable] == value


def test_variables_stand_in_for_missing_secret_files(secrets_dir: Path) -> None:
    run = run_entrypoint(
        secrets_dir, {"JWT_SECRET": "jwt-from-env", "OPENAI_API_KEY": "key-from-env"}
    )

    assert run.returncode == 0, run.stderr
    assert run.env["JWT_SECRET"] == "jwt-from-env"
    assert run.env["OPENAI_API_KEY"] == "key-from-env"
    assert "REDIS_PASSWORD" not in run.env


def test_blank_secret_file_leaves_the_variable_alone(secrets_dir: Path) -> None:
    write_secrets(secrets_dir, jwt_secret=" \n\t\n", openai_api_key="key-from-file")

    run = run_entrypoint(secrets_dir, {"JWT_SECRET": "jwt-from-env"})

    assert run.returncode == 0, run.stderr
    assert run.env["JWT_SECRET"] == "jwt-from-env"
    assert f"{secrets_dir}/jwt_secret is blank" in run.stderr


def test_redis_password_file_is_optional(secrets_dir: Path) -> None:
    write_secrets(secrets_dir, jwt_secret="jwt", openai_api_key="key")

    run = run_entrypoint(secrets_dir, {"SECRETS_WAIT_SECONDS": "5"})

    assert run.returncode == 0, run.stderr
    assert "REDIS_PASSWORD" not in run.env
    assert "waiting" not in run.stderr


@pytest.mark.parametrize(
    "shell",
    [("sh",), ("bash",), ("sh", "-x"), ("bash", "-x")],
    ids=["sh", "bash", "sh -x", "bash -x"],
)
def test_no_secret_value_is_printed_even_when_tracing(
    secrets_dir: Path, redis_port: int, shell: tuple[str, ...]
) -> None:
    expected = all_secrets(secrets_dir)
    url_password = secret_value("url-password")

    run = run_entrypoint(
        secrets_dir,
        {"REDIS_URL": f"redis://:{url_password}@127.0.0.1:{redis_port}/0"},
        shell=shell,
    )

    assert run.returncode == 0, run.stderr
    assert run.env["JWT_SECRET"] == expected["JWT_SECRET"]  # the command itself did see them
    printed = run.stdout + run.stderr
    for value in [*expected.values(), url_password]:
        assert value not in printed


def test_missing_required_secret_fails_within_its_bound_naming_the_file(
    secrets_dir: Path,
) -> None:
    write_secrets(secrets_dir, openai_api_key="key")

    run = run_entrypoint(secrets_dir, {"SECRETS_WAIT_SECONDS": "1"})

    assert run.returncode == 1
    assert run.report is None
    assert f"{secrets_dir}/jwt_secret" in run.stderr
    assert f"{secrets_dir}/openai_api_key" not in run.stderr.splitlines()[-1]


def test_secret_written_during_the_wait_is_picked_up(secrets_dir: Path) -> None:
    write_secrets(secrets_dir, openai_api_key="key")
    value = secret_value("late-jwt")

    def write_late() -> None:
        time.sleep(0.5)
        staged = secrets_dir.parent / "jwt_secret.partial"
        staged.write_text(value + "\n")
        staged.replace(secrets_dir / "jwt_secret")  # appears whole, as a secret agent writes it

    writer = threading.Thread(target=write_late)
    writer.start()
    try:
        run = run_entrypoint(secrets_dir, {"SECRETS_WAIT_SECONDS": "10"})
    finally:
        writer.join()

    assert run.returncode == 0, run.stderr
    assert run.env["JWT_SECRET"] == value
    assert "waiting up to 10s" in run.stderr


def test_required_secrets_can_be_narrowed(secrets_dir: Path) -> None:
    write_secrets(secrets_dir, jwt_secret="jwt")

    run = run_entrypoint(
        secrets_dir, {"REQUIRED_SECRETS": "jwt_secret", "SECRETS_WAIT_SECONDS": "1"}
    )

    assert run.returncode == 0, run.stderr
    assert "OPENAI_API_KEY" not in run.env


def test_unknown_required_secret_is_refused(secrets_dir: Path) -> None:
    run = run_entrypoint(secrets_dir, {"REQUIRED_SECRETS": "jwt_secret api_token"})

    assert run.returncode == 1
    assert "unknown secret 'api_token'" in run.stderr


@pytest.mark.parametrize("variable", ["SECRETS_WAIT_SECONDS", "REDIS_WAIT_SECONDS"])
def test_wait_that_is_not_a_number_is_refused(secrets_dir: Path, variable: str) -> None:
    run = run_entrypoint(secrets_dir, {variable: "soon", "REQUIRED_SECRETS": ""})

    assert run.returncode == 1
    assert variable in run.stderr


# -------------------------------------------------------------------------------------- Redis


@pytest.fixture
def no_secrets_needed() -> dict[str, str]:
    """Settings under which the secrets play no part, for the Redis tests."""
    return {"REQUIRED_SECRETS": ""}


def test_waits_for_a_reachable_redis(
    secrets_dir: Path, redis_port: int, no_secrets_needed: dict[str, str]
) -> None:
    env = {**no_secrets_needed, "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_port)}

    run = run_entrypoint(secrets_dir, env)

    assert run.returncode == 0, run.stderr
    assert f"redis at 127.0.0.1:{redis_port} accepts connections" in run.stderr


def test_unreachable_redis_fails_within_its_bound_naming_host_and_port(
    secrets_dir: Path, no_secrets_needed: dict[str, str]
) -> None:
    port = free_port()
    env = {
        **no_secrets_needed,
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(port),
        "REDIS_WAIT_SECONDS": "1",
    }

    run = run_entrypoint(secrets_dir, env)

    assert run.returncode == 1
    assert run.report is None
    assert f"redis at 127.0.0.1:{port}" in run.stderr


def test_redis_url_wins_over_redis_host(
    secrets_dir: Path, redis_port: int, no_secrets_needed: dict[str, str]
) -> None:
    env = {
        **no_secrets_needed,
        "REDIS_URL": f"redis://:pw@127.0.0.1:{redis_port}/0",
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(free_port()),
        "REDIS_WAIT_SECONDS": "1",
    }

    run = run_entrypoint(secrets_dir, env)

    assert run.returncode == 0, run.stderr
    assert f"redis at 127.0.0.1:{redis_port} accepts connections" in run.stderr


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://127.0.0.1:{port}", "127.0.0.1:{port}"),
        ("redis://:secret@127.0.0.1:{port}/0", "127.0.0.1:{port}"),
        ("redis://user:secret@127.0.0.1:{port}/3?socket_timeout=5", "127.0.0.1:{port}"),
        ("rediss://default:secret@localhost:{port}", "localhost:{port}"),
        ("redis://[::1]:{port}/0", "::1:{port}"),
        ("redis://cache.invalid", "cache.invalid:6379"),
        ("rediss://:secret@cache.invalid/1", "cache.invalid:6379"),
    ],
)
def test_redis_url_gives_the_host_and_port_to_wait_for(
    secrets_dir: Path, no_secrets_needed: dict[str, str], url: str, target: str
) -> None:
    port = free_port()  # nothing listens there, so the message shows what was parsed
    env = {**no_secrets_needed, "REDIS_URL": url.format(port=port), "REDIS_WAIT_SECONDS": "0"}

    run = run_entrypoint(secrets_dir, env)

    assert run.returncode == 1
    assert f"no TCP connection to redis at {target.format(port=port)}" in run.stderr
    assert "secret" not in run.stderr


@pytest.mark.parametrize(
    "url", ["unix:///run/redis.sock", "redis://:secret@", "redis://cache:port/0", "redis://"]
)
def test_unreadable_redis_url_skips_the_wait(
    secrets_dir: Path, no_secrets_needed: dict[str, str], url: str
) -> None:
    run = run_entrypoint(secrets_dir, {**no_secrets_needed, "REDIS_URL": url})

    assert run.returncode == 0, run.stderr
    assert "not waiting for Redis" in run.stderr
    assert "secret" not in run.stderr


def test_no_redis_configured_means_no_wait(
    secrets_dir: Path, no_secrets_needed: dict[str, str]
) -> None:
    run = run_entrypoint(secrets_dir, {**no_secrets_needed, "REDIS_PORT": str(free_port())})

    assert run.returncode == 0, run.stderr
    assert "redis" not in run.stderr.lower()


# ------------------------------------------------------------------------------------- exec


def test_command_replaces_the_shell(secrets_dir: Path, no_secrets_needed: dict[str, str]) -> None:
    run = run_entrypoint(secrets_dir, no_secrets_needed)

    assert run.returncode == 0, run.stderr
    assert run.report is not None
    assert run.report["pid"] == run.popen_pid
    assert run.report["ppid"] == os.getpid()


def test_command_exit_status_is_passed_on(
    secrets_dir: Path, no_secrets_needed: dict[str, str]
) -> None:
    run = run_entrypoint(secrets_dir, no_secrets_needed, command=("sh", "-c", "exit 7"))

    assert run.returncode == 7


def test_no_command_is_refused(secrets_dir: Path, no_secrets_needed: dict[str, str]) -> None:
    run = run_entrypoint(secrets_dir, no_secrets_needed, command=())

    assert run.returncode == 1
    assert "no command given" in run.stderr


# ------------------------------------------------------------------------ the User Service stub


@dataclass
class Stub:
    """A running stub from tools/."""

    process: subprocess.Popen[bytes]
    base_url: str
    log: Path


def call(method: str, url: str, body: bytes | None = None) -> tuple[int, Any]:
    """One HTTP request; the status and the decoded JSON answer, errors included."""
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Stub]:
    """The User Service stub on a free port, ready to answer; stopped with SIGTERM afterwards."""
    with running_stub(STUB, tmp_path / "stub.log") as running:
        yield running


@pytest.fixture
def model_stub(tmp_path: Path) -> Iterator[Stub]:
    """The model stub on a free port, ready to answer; stopped with SIGTERM afterwards."""
    with running_stub(MODEL_STUB, tmp_path / "model-stub.log") as running:
        yield running


@contextlib.contextmanager
def running_stub(script: Path, log: Path) -> Iterator[Stub]:
    """The stub `script` on a free port, ready to answer; stopped with SIGTERM afterwards."""
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, str(script)],
            env={**os.environ, "PORT": str(port)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    running = Stub(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                call("GET", f"{running.base_url}/health")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the stub did not start: {log.read_text()}")
                time.sleep(0.05)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_stub_stores_and_lists_food_entries(stub: Stub) -> None:
    entry = {"userId": "user-1", "name": "Salmon", "calories": 450}

    status, created = call("POST", f"{stub.base_url}/food-entries", json.dumps(entry).encode())
    _, listed = call("GET", f"{stub.base_url}/food-entries?userId=user-1")
    _, others = call("GET", f"{stub.base_url}/food-entries?userId=user-2")

    assert status == 201
    assert uuid.UUID(created["id"])
    assert created["createdAt"]
    assert created.items() >= entry.items()
    assert listed == {"entries": [created]}
    assert others == {"entries": []}


@pytest.mark.parametrize(
    "body", [b"not json", b"[1, 2]", b'{"name": "Salmon"}', b'{"userId": "user-1"}', b""]
)
def test_stub_rejects_a_body_that_is_not_an_entry(stub: Stub, body: bytes) -> None:
    status, answer = call("POST", f"{stub.base_url}/food-entries", body)

    assert status == 400
    assert answer["error"]


def test_stub_health(stub: Stub) -> None:
    assert call("GET", f"{stub.base_url}/health")[0] == 200


def test_stub_logs_each_request_and_stops_cleanly_on_sigterm(stub: Stub) -> None:
    call("GET", f"{stub.base_url}/health")

    stub.process.send_signal(signal.SIGTERM)
    returncode = stub.process.wait(timeout=10)

    assert returncode == 0
    log = stub.log.read_text()
    assert '"GET /health HTTP/1.1" 200' in log
    assert "stopped" in log


def test_model_stub_answers_the_service_with_an_analysis(
    model_stub: Stub,
    client_with: Callable[..., FlaskClient],
    auth_headers: dict[str, str],
) -> None:
    client = client_with(openai_base_url=f"{model_stub.base_url}/v1", nutrition_source="usda-sr28")

    response = post_photo(client, auth_headers, images.jpeg(color=(200, 120, 60)))

    assert response.status_code == 200
    analysis = response.get_json()["analysis"]
    assert analysis["name"] == "Grilled Salmon with Asparagus"
    salmon, asparagus, oil = analysis["items"]
    assert [item["nutritionSource"] for item in analysis["items"]] == ["usda-sr28"] * 3
    assert "salmon" in salmon["usdaDescription"].lower()
    assert "asparagus" in asparagus["usdaDescription"].lower()
    assert "olive" in oil["usdaDescription"].lower()
    assert analysis["calories"] == sum(item["calories"] for item in analysis["items"])
    assert call("GET", f"{model_stub.base_url}/stats") == (200, {"completions": 1})


def test_model_stub_knows_any_model_and_refuses_a_body_that_is_not_json(model_stub: Stub) -> None:
    status, model = call("GET", f"{model_stub.base_url}/v1/models/gpt-4.1-mini")
    refused, error = call("POST", f"{model_stub.base_url}/v1/chat/completions", b"not json")

    assert (status, model["id"], model["object"]) == (200, "gpt-4.1-mini", "model")
    assert refused == 400
    assert error["error"]["message"]


def test_model_stub_stops_cleanly_on_sigterm(model_stub: Stub) -> None:
    call("GET", f"{model_stub.base_url}/health")

    model_stub.process.send_signal(signal.SIGTERM)

    assert model_stub.process.wait(timeout=10) == 0
    assert "model-stub: stopped" in model_stub.log.read_text()
