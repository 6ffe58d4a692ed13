"""The Makefile as a newcomer meets it: `make` lists the targets, `make run` checks its port, serves
on loopback with curl lines for that address, and `make user-service` gives `?save=true` a User
Service; `make secrets` writes exactly the files the compose stack mounts, and one token from
`make token` works against `make run` and the stack alike, its secret readable in the container."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jwt
import pytest
import requests
import yaml

from tests.fakes import free_port

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0  # seconds for gunicorn or the stub to say it listens; not a measurement
# Settings of the caller's shell that would change what `make run` does.
INHERITED = re.compile(
    r"^(OPENAI_|REDIS_|JWT_|USER_SERVICE_|GUNICORN_|PROMETHEUS_|STORE_|MAKE|MFLAGS$|HOST$|PORT$|"
    r"SECRETS_DIR$|USER_ID$|RESULTS$)"
)


@pytest.fixture
def make_env(tmp_path: Path) -> dict[str, str]:
    """A fresh shell's environment: none of the service's settings, files in tmp_path."""
    assert shutil.which("make"), "make is needed on the PATH (the README's two commands use it)"
    env = {name: value for name, value in os.environ.items() if not INHERITED.match(name)}
    env["JWT_SECRET_FILE"] = str(tmp_path / "secrets" / "jwt_secret.txt")
    # an empty folder for the service's own secret files, not the host's /run/secrets
    env["SECRETS_DIR"] = str(tmp_path / "run-secrets")
    env["STORE_PATH"] = str(tmp_path / "store.sqlite3")
    env["GUNICORN_WORKERS"] = "1"
    env["GUNICORN_THREADS"] = "4"
    return env


def make(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run make in the repository and wait for it."""
    return subprocess.run(
        ["make", *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@contextmanager
def started(env: dict[str, str], *arguments: str, ready: str) -> Iterator[Path]:
    """make running in its own process group until ``ready`` appears in its output (a file)."""
    output = Path(env["STORE_PATH"]).parent / "make-output.txt"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            ["make", *arguments],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while ready not in output.read_text(errors="replace"):
            assert process.poll() is None, (
                f"make {' '.join(arguments)} exited:\n{output.read_text()}"
            )
            assert time.monotonic() < deadline, f"never said {ready!r}:\n{output.read_text()}"
            time.sleep(0.05)
        yield output
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STARTUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize("arguments", [(), ("help",)], ids=["make", "make help"])
def test_make_alone_lists_the_targets_one_line_each(
    make_env: dict[str, str], arguments: tuple[str, ...]
) -> None:
    finished = make(make_env, *arguments)

    assert finished.returncode == 0, finished.stderr
    assert "is up to date" not in finished.stdout
    listed = re.findall(r"^  make ([a-z-]+) +\S", finished.stdout, re.MULTILINE)
    declared = re.findall(r"^\.PHONY: (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert sorted(listed) == sorted(declared[0].split())


def test_make_run_with_its_port_taken_says_which_port_to_use(make_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        finished = make(make_env, "run", f"PORT={port}")

    assert finished.returncode != 0
    assert re.search(rf"^port {port} is in use; run `make run PORT=\d+`$", finished.stderr, re.M)
    assert "curl" not in finished.stdout
    assert "gunicorn" not in finished.stdout


def test_make_run_serves_on_loopback_with_a_curl_line_for_that_address(
    make_env: dict[str, str],
) -> None:
    port = free_port()

    with started(make_env, "run", f"PORT={port}", ready="Booting worker") as output:
        printed = output.read_text()
        health_url = re.search(r"curl -s '(http://[^']+/health)'", printed)
        assert health_url, printed
        health = requests.get(health_url.group(1), timeout=10)
        token = make(make_env, "-s", "token").stdout.strip()
        foods = requests.get(
            f"http://127.0.0.1:{port}/foods",
            params={"q": "salmon"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )

    assert f"Listening at: http://127.0.0.1:{port} " in printed
    assert health_url.group(1) == f"http://127.0.0.1:{port}/health"
    assert f"'http://127.0.0.1:{port}/analyze-food?save=true'" in printed
    assert "make user-service" in printed
    assert health.json()["service"] == "image-service"
    assert foods.status_code == 200, foods.text  # `make token`'s token is accepted
    # what the service says at start reaches the terminal (no model is configured here)
    assert "Image Service: model" in printed
    assert "No model is configured" in printed


def test_make_run_binds_the_host_it_is_given(make_env: dict[str, str]) -> None:
    planned = make(make_env, "--dry-run", "run", "HOST=0.0.0.0", "PORT=8090")

    assert "GUNICORN_BIND=0.0.0.0:8090 " in planned.stdout
    assert "--serve 0.0.0.0:8090" in planned.stdout


def test_make_user_service_stores_a_food_entry(make_env: dict[str, str]) -> None:
    port = free_port()
    listening = f"listening on 127.0.0.1:{port}"

    with started(make_env, "user-service", f"USER_SERVICE_PORT={port}", ready=listening):
        stored = requests.post(
            f"http://127.0.0.1:{port}/food-entries",
            json={"userId": "dev-user", "name": "Grilled Salmon"},
            timeout=10,
        )

    assert stored.status_code == 201
    assert stored.json()["id"]


def test_the_development_secret_is_readable_in_the_container_and_private_to_its_folder(
    tmp_path: Path,
) -> None:
    secrets_dir = tmp_path / "secrets"
    secret = secrets_dir / "jwt_secret.txt"
    command = [sys.executable, "tools/dev_token.py", "--secret-file", str(secret)]

    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)

    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(secret.stat().st_mode) == 0o644
    assert "wrote a new development JWT secret" in first.stderr
    assert "wrote" not in second.stderr
    claims = jwt.decode(second.stdout.strip(), secret.read_text().strip(), algorithms=["HS256"])
    assert claims["sub"] == "dev-user"


# ---------------------------------------------------------------- secrets/ on a fresh clone


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """A fresh clone as `make secrets` and `make token` see it: secrets/ holds what git has."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Makefile", "docker-compose.yml"):
        shutil.copy2(ROOT / name, clone / name)
    shutil.copytree(ROOT / "tools", clone / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "secrets").mkdir()
    for tracked in [ROOT / "secrets" / ".gitignore", *(ROOT / "secrets").glob("*.example")]:
        shutil.copy2(tracked, clone / "secrets" / tracked.name)
    # the repository's virtualenv and requirements, so that make finds it up to date
    for name in (".venv", "requirements.txt", "requirements-dev.txt"):
        (clone / name).symlink_to(ROOT / name)
    return clone


def mounted_secret_files(clone: Path) -> dict[str, Path]:
    """Each secret of docker-compose.yml and the file it mounts when no *_FILE variable is set."""
    declared = yaml.safe_load((clone / "docker-compose.yml").read_text())["secrets"]
    files = {}
    for name, source in declared.items():
        default = re.fullmatch(r"\$\{[A-Z_]+:-(.+)\}", source["file"])
        assert default, f"secret {name} has no default file: {source['file']}"
        files[name] = (clone / default.group(1)).resolve()
    return files


def make_in(clone: Path, make_env: dict[str, str], *arguments: str) -> str:
    """Run make in ``clone`` with none of the test's secret settings; its stdout."""
    env = {k: v for k, v in make_env.items() if k not in ("JWT_SECRET_FILE", "SECRETS_DIR")}
    finished = subprocess.run(
        ["make", *arguments], cwd=clone, env=env, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    assert "pip install" not in finished.stdout  # the repository's virtualenv was up to date
    return finished.stdout


def test_make_secrets_writes_exactly_the_files_the_stack_mounts(
    fresh_clone: Path, make_env: dict[str, str]
) -> None:
    make_in(fresh_clone, make_env, "secrets")

    secrets_dir = fresh_clone / "secrets"
    written = {
        path.resolve()
        for path in secrets_dir.iterdir()
        if path.name != ".gitignore" and not path.name.endswith(".example")
    }
    assert written == set(mounted_secret_files(fresh_clone).values())
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by the containers' users
        assert path.read_text().strip()


@pytest.mark.parametrize(
    "commands",
    [("secrets", "token"), ("token", "secrets")],
    ids=["make secrets first", "make token first"],
)
def test_a_token_from_make_token_verifies_against_the_secret_the_stack_mounts(
    fresh_clone: Path, make_env: dict[str, str], commands: tuple[str, str]
) -> None:
    printed = {command: make_in(fresh_clone, make_env, "-s", command) for command in commands}

    mounted = mounted_secret_files(fresh_clone)["jwt_secret"].read_text().strip()
    claims = jwt.decode(printed["token"].strip(), mounted, algorithms=["HS256"])
    assert claims["sub"] == "dev-user"
    assert not (fresh_clone / ".local" / "secrets").exists()
