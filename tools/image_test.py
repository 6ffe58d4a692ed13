"""`make image-test`: the Docker image and the compose stack, built and run for real.

    make image-test                  # needs a Docker engine with Compose v2 and the base images

1. `nginx -t` on deploy/nginx.conf in the gateway's image.
2. `docker build` the image; run it alone with secrets mounted: /health answers, it runs as uid
   10001 under tini, turns healthy, and exits 0 on SIGTERM. As a baseline, 200 slow-header
   connections straight to gunicorn, and what they do to /health.
3. `docker compose up --wait` with the stub model, on a project name, port and secrets of its
   own: analyses, a cache hit and a save through the gateway, the gateway's own JSON errors, the
   Image Service unpublished, and /health and a cache hit timed while 200 slow-header
   connections are held open against the gateway; the SR28 table the image carries is loaded
   with no setting, and GET /foods and POST /nutrition answer from it.
4. Another copy of SR28 (USDA_SR28_DIR on the host, else the repository's copy unpacked as USDA
   publishes it): the stack again with deploy/compose.nutrition.yml, the folder mounted
   read-only, /health naming it with the same identity, an analysis counted from it.
5. No tini warning in any container's log; everything is removed at the end, pass or fail.

Every wait is bounded and all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nutrition import BUNDLED_SR28, NutritionTable, unpack_sr28  # noqa: E402

IMAGE = "image-service:image-test"
CONTAINER = "image-service-image-test"
# Where the image keeps the embedded store (its ENV STORE_PATH).
STORE_FOLDER = "/var/lib/image-service"
PROJECT = "image-service-test"
SLOW_CONNECTIONS = 200
SLOW_SECONDS = 12.0
PROBE_INTERVAL = 0.25
PROBE_TIMEOUT = 5.0
LATENCY_GOAL = 1.0
TINI_WARNING = "Tini is not running as PID 1"
TOKEN_USER = "image-test-user"
SR28_OVERRIDE = "deploy/compose.nutrition.yml"
# The gateway's client_max_body_size, equal to MAX_UPLOAD_MB's default (25).
GATEWAY_BODY_LIMIT = 25 * 1024 * 1024


class ImageTestFailure(AssertionError):
    """A check of the image or the stack failed; the message says which."""


def say(message: str) -> None:
    """One progress line."""
    print(f"image-test: {message}", flush=True)


def check(condition: bool, message: str) -> None:
    """Fail with `message` unless `condition` holds; report it when it does."""
    if not condition:
        raise ImageTestFailure(message)
    say(f"ok: {message}")


def docker(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Run a docker command; its stdout, or a failure naming it with its stderr."""
    result = subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise ImageTestFailure(f"docker {' '.join(args)} failed:\n{result.stderr.strip()}")
    return result.stdout


def free_port() -> int:
    """A TCP port on loopback that nothing listens on at the moment of asking."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(what: str, ready: Callable[[], bool], seconds: float) -> None:
    """Poll `ready` twice a second until it holds, at most `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if ready():
                return
        time.sleep(0.5)
    raise ImageTestFailure(f"gave up after {seconds:g}s waiting for {what}")


def photo() -> bytes:
    """A small drawn plate, as a JPEG."""
    image = Image.new("RGB", (640, 480), (186, 150, 112))
    draw = ImageDraw.Draw(image)
    draw.ellipse((80, 40, 560, 440), fill=(245, 245, 240))
    draw.ellipse((200, 140, 400, 280), fill=(244, 140, 92))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_secrets(folder: Path) -> None:
    """Random Redis and JWT secrets and a stand-in OpenAI key, readable by the containers."""
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)  # the umask must not hide them from uid 10001
    values = {
        "redis_password": uuid.uuid4().hex,
        "openai_api_key": "sk-image-test-" + uuid.uuid4().hex,
        "jwt_secret": uuid.uuid4().hex + uuid.uuid4().hex,
    }
    for name, value in values.items():
        path = folder / name
        path.write_text(value + "\n", encoding="utf-8")
        path.chmod(0o644)


def token_for(secrets_dir: Path) -> str:
    """A token from `make token`, signed with the JWT secret the stack mounts from `secrets_dir`."""
    secret_file = f"JWT_SECRET_FILE={secrets_dir / 'jwt_secret'}"
    result = subprocess.run(
        ["make", "-s", "token", secret_file, f"USER_ID={TOKEN_USER}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    return result.stdout.strip()


# ---------------------------------------------------------------- slow-header clients


@dataclass
class SlowHeaderClients:
    """Connections that send a request's headers one byte a second and never finish them."""

    port: int
    count: int
    sockets: list[socket.socket | None] = field(default_factory=list)
    opened_at: list[float] = field(default_factory=list)
    opened: int = 0
    lifetimes: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        except OSError:
            return None
        self.opened += 1
        return sock

    def _drip(self) -> None:
        while not self._stop.wait(1.0):
            live = [sock for sock in self.sockets if sock is not None]
            # The server never answers a request it has not read; readable means it hung up.
            closed = set(select.select(live, [], [], 0)[0]) if live else set()
            for index, sock in enumerate(self.sockets):
                try:
                    if sock is None or sock in closed:
                        raise OSError("closed")
                    sock.sendall(b"x")
                except OSError:
                    if sock is not None:
                        self.lifetimes.append(time.monotonic() - self.opened_at[index])
                        sock.close()
                    self.sockets[index] = self._open()
                    self.opened_at[index] = time.monotonic()

    def held(self) -> int:
        """How many are open now."""
        return sum(sock is not None for sock in self.sockets)

    def __enter__(self) -> SlowHeaderClients:
        self.sockets = [self._open() for _ in range(self.count)]
        self.opened_at = [time.monotonic()] * self.count
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in self.sockets:
            if sock is not None:
                sock.close()


@dataclass
class Timings:
    """Latencies of one kind of probe; a probe that failed or timed out counts as a miss."""

    name: str
    seconds: list[float] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """p50, p95 and max, and the misses."""
        if not self.seconds:
            return f"{self.name}: no answer at all ({len(self.misses)} misses)"
        ordered = sorted(self.seconds)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return (
            f"{self.name}: {len(ordered)} answers, p50 {statistics.median(ordered) * 1000:.0f} ms,"
            f" p95 {p95 * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms;"
            f" {len(self.misses)} missed"
        )

    def worst(self) -> float:
        """The slowest answer, infinite when any probe missed."""
        return float("inf") if self.misses or not self.seconds else max(self.seconds)


def timed(
    timings: Timings, call: Callable[[], requests.Response], expect: Callable[..., bool]
) -> None:
    """Run one probe and record its latency, or why it missed."""
    started = time.monotonic()
    try:
        response = call()
    except requests.RequestException as error:
        timings.misses.append(type(error).__name__)
        return
    elapsed = time.monotonic() - started
    if expect(response):
        timings.seconds.append(elapsed)
    else:
        timings.misses.append(f"HTTP {response.status_code}")


def median_lifetime(lifetimes: list[float]) -> str:
    """How long the server held a slow connection before closing it, when it did."""
    return f" after {statistics.median(lifetimes):.1f} s (median)" if lifetimes else ""


def under_slow_headers(
    port: int, probes: dict[str, tuple[Callable[[], requests.Response], Callable[..., bool]]]
) -> tuple[list[Timings], SlowHeaderClients]:
    """Each probe, run every PROBE_INTERVAL while SLOW_CONNECTIONS slow clients hold the port."""
    results = {name: Timings(name) for name in probes}
    with SlowHeaderClients(port, SLOW_CONNECTIONS) as clients:
        time.sleep(1.5)  # every connection has sent its first bytes
        say(f"{clients.held()} slow-header connections open on port {port}")
        deadline = time.monotonic() + SLOW_SECONDS
        while time.monotonic() < deadline:
            for name, (call, expect) in probes.items():
                timed(results[name], call, expect)
            time.sleep(PROBE_INTERVAL)
        held = clients.held()
    say(
        f"{held} still open at the end; {clients.opened} opened in all,"
        f" {len(clients.lifetimes)} closed by the server{median_lifetime(clients.lifetimes)}"
    )
    return list(results.values()), clients


# ---------------------------------------------------------------- the image alone


def container_logs(name: str) -> str:
    """stdout and stderr of a container, together."""
    result = subprocess.run(
        ["docker", "logs", name], capture_output=True, text=True, timeout=30, check=False
    )
    return result.stdout + result.stderr


def check_image_alone(secrets_dir: Path) -> None:
    """Run the image by itself: health, user, init, healthcheck, SIGTERM, and a baseline."""
    port = free_port()
    docker(
        "run",
        "-d",
        "--name",
        CONTAINER,
        "-p",
        f"127.0.0.1:{port}:8083",
        "-v",
        f"{secrets_dir}:/run/secrets:ro",
        "--health-interval",
        "2s",
        "--health-start-period",
        "30s",
        IMAGE,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until("/health on the container", lambda: requests.get(f"{url}/health", timeout=2).ok, 60)
    checks = requests.get(f"{url}/health", timeout=5).json()["checks"]
    expected = {"redis": "not configured", "openai": "configured", "jwt": "configured"}
    check(
        expected.items() <= checks.items(),
        f"/health answers 200 with the mounted secrets: {checks}",
    )
    check(docker("exec", CONTAINER, "id", "-u").strip() == "10001", "it runs as uid 10001")
    check(checks.get("store") == "embedded", f"without Redis the embedded store: {checks}")
    modes = docker(
        "exec", CONTAINER, "stat", "-c", "%a %u", STORE_FOLDER, f"{STORE_FOLDER}/store.sqlite3"
    )
    check(
        modes.split() == ["700", "10001", "600", "10001"],
        f"the store is private to uid 10001 in {STORE_FOLDER} (folder 0700, file 0600): {modes!r}",
    )
    init = docker("exec", CONTAINER, "cat", "/proc/1/cmdline").replace("\0", " ")
    check(init.startswith("/usr/bin/tini"), f"PID 1 is tini: {init.strip()}")

    def healthy() -> bool:
        return docker("inspect", "-f", "{{.State.Health.Status}}", CONTAINER).strip() == "healthy"

    wait_until("the image's HEALTHCHECK to report healthy", healthy, 60)
    check(True, "the image's HEALTHCHECK reports healthy")

    timings, _ = under_slow_headers(
        port, {"/health straight to gunicorn": (lambda: health_probe(url), is_healthy)}
    )
    say(f"baseline without the gateway: {timings[0].summary()}")

    docker("kill", "--signal", "TERM", CONTAINER)
    status = docker("wait", CONTAINER, timeout=60).strip()
    check(status == "0", f"SIGTERM stops it with exit status 0 (got {status})")
    logs = container_logs(CONTAINER)
    check(TINI_WARNING not in logs, "no tini warning in the container's log")
    docker("rm", CONTAINER)


def health_probe(url: str) -> requests.Response:
    """GET /health."""
    return requests.get(f"{url}/health", timeout=PROBE_TIMEOUT)


def is_healthy(response: requests.Response) -> bool:
    """A 200 health answer."""
    return response.status_code == 200


# ---------------------------------------------------------------- the compose stack


@dataclass
class Stack:
    """The compose project under test."""

    environment: dict[str, str]
    url: str
    files: tuple[str, ...] = ()

    def compose_args(self) -> list[str]:
        """The project, its profile and, when there are extra files, every compose file."""
        named = ["docker-compose.yml", *self.files] if self.files else []
        return [
            "-p",
            PROJECT,
            "--profile",
            "stub",
            *(arg for name in named for arg in ("-f", name)),
        ]

    def compose(self, *args: str, timeout: float = 180) -> str:
        """A `docker compose` command on this project."""
        return docker(
            "compose",
            *self.compose_args(),
            *args,
            timeout=timeout,
            env=self.environment,
        )


@contextlib.contextmanager
def running_stack(
    secrets_dir: Path, log_file: Path, files: tuple[str, ...] = (), **extra: str
) -> Iterator[Stack]:
    """The stack up and healthy, with the stub model; taken down whatever happens."""
    port = free_port()
    environment = {
        **os.environ,
        "IMAGE_SERVICE_IMAGE": IMAGE,
        "GATEWAY_PORT": f"127.0.0.1:{port}",
        "OPENAI_BASE_URL": "http://model-stub:8090/v1",
        "REDIS_PASSWORD_FILE": str(secrets_dir / "redis_password"),
        "OPENAI_API_KEY_FILE": str(secrets_dir / "openai_api_key"),
        "JWT_SECRET_FILE": str(secrets_dir / "jwt_secret"),
        **extra,
    }
    stack = Stack(environment, f"http://127.0.0.1:{port}", files)
    try:
        stack.compose("up", "-d", "--wait", "--no-build")
        say(f"compose stack up; the gateway listens on 127.0.0.1:{port}")
        yield stack
    finally:
        logs = subprocess.run(
            ["docker", "compose", *stack.compose_args(), "logs", "--no-color"],
            capture_output=True,
            text=True,
            timeout=60,
            env=environment,
            check=False,
            cwd=ROOT,
        )
        log_file.write_text(logs.stdout + logs.stderr)
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30")
        say("compose stack removed")


def analyze(stack: Stack, token: str, image: bytes, **params: str) -> requests.Response:
    """POST /analyze-food through the gateway."""
    return requests.post(
        f"{stack.url}/analyze-food",
        params=params,
        files={"image": ("meal.jpg", image, "image/jpeg")},
        headers={"Authorization": f"Bearer {token}"},
        timeout=PROBE_TIMEOUT,
    )


def gateway_error(response: requests.Response, status: int, code: str) -> bool:
    """An error the gateway answered itself, as JSON in the service's shape with a request id."""
    try:
        body = response.json()
    except ValueError:
        return False
    return (
        response.status_code == status
        and response.headers.get("Content-Type", "").startswith("application/json")
        and body.get("code") == code
        and bool(body.get("error"))
        and bool(response.headers.get("X-Request-ID"))
    )


def check_stack(stack: Stack, token: str) -> None:
    """Analyses and errors through the gateway, then latencies under slow-header clients."""
    health = requests.get(f"{stack.url}/health", timeout=5)
    check(
        health.status_code == 200 and health.json()["checks"]["redis"] == "connected",
        f"/health through the gateway: {health.status_code} {health.json()['checks']}",
    )
    published = stack.compose("port", "gateway", "8080").strip()
    check(bool(published), f"the gateway is published on {published}")
    service_ports = docker(
        "ps",
        "--filter",
        f"label=com.docker.compose.project={PROJECT}",
        "--filter",
        "label=com.docker.compose.service=image-service",
        "--format",
        "{{.Ports}}",
    ).strip()
    check("->" not in service_ports, f"the Image Service publishes no port ({service_ports})")

    meal = photo()
    first = analyze(stack, token, meal)
    check(
        first.status_code == 200 and first.json()["source"] == "api",
        f"an analysis through the gateway asks the model: {first.status_code}"
        f" {first.json().get('analysis', {}).get('name')}",
    )
    hit = analyze(stack, token, meal)
    check(
        hit.status_code == 200 and hit.json()["source"] == "cache", "the same photo is a cache hit"
    )
    saved = analyze(stack, token, meal, save="true")
    check(
        saved.status_code == 200 and bool(saved.json()["analysis"].get("entryId")),
        "save=true stores an entry in the User Service",
    )
    echoed = requests.get(f"{stack.url}/health", headers={"X-Request-ID": "trace-42"}, timeout=5)
    check(
        echoed.headers.get("X-Request-ID") == "trace-42", "a caller's X-Request-ID passes through"
    )
    made = requests.get(f"{stack.url}/health", headers={"X-Request-ID": "bad id!"}, timeout=5)
    made_id = made.headers.get("X-Request-ID", "")
    check(bool(made_id) and made_id != "bad id!", f"a bad X-Request-ID is replaced ({made_id})")

    too_big = requests.post(
        f"{stack.url}/analyze-food",
        files={"image": ("big.jpg", b"\0" * (GATEWAY_BODY_LIMIT + 1024 * 1024), "image/jpeg")},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    check(
        gateway_error(too_big, 413, "payload_too_large"),
        f"a body 1 MB over the gateway's {GATEWAY_BODY_LIMIT >> 20} MB: 413 payload_too_large",
    )
    big_header = requests.get(f"{stack.url}/health", headers={"X-Big": "x" * 80_000}, timeout=10)
    check(
        gateway_error(big_header, 431, "header_too_large"), "an 80 kB header: 431 header_too_large"
    )
    long_token = requests.post(
        f"{stack.url}/analyze-food", headers={"Authorization": "Bearer " + "a" * 20_000}, timeout=10
    )
    check(
        long_token.status_code == 401 and long_token.json()["code"] == "invalid_token",
        "a 20 kB token reaches the service and gets its 401 invalid_token",
    )
    metrics = requests.get(f"{stack.url}/metrics", timeout=5)
    check(gateway_error(metrics, 404, "not_found"), "/metrics stays off the gateway: 404")
    check_bundled_table(stack, token)

    timings, _ = under_slow_headers(
        int(stack.url.rsplit(":", 1)[1]),
        {
            "/health through the gateway": (lambda: health_probe(stack.url), is_healthy),
            "cache hit through the gateway": (
                lambda: analyze(stack, token, meal),
                lambda response: (
                    response.status_code == 200 and response.json()["source"] == "cache"
                ),
            ),
        },
    )
    for timing in timings:
        say(f"under {SLOW_CONNECTIONS} slow-header connections: {timing.summary()}")
    for timing in timings:
        check(
            timing.worst() < LATENCY_GOAL,
            f"{timing.name} answered every probe within {LATENCY_GOAL:g} s"
            f" (max {timing.worst() * 1000:.0f} ms)",
        )

    stack.compose("stop", "--timeout", "30", "image-service")
    # Until the gateway's cached address of the service expires (5 s), connecting to it times
    # out (504); then the name no longer resolves (502).
    answers: list[requests.Response] = []

    def bad_gateway() -> bool:
        answers.append(requests.get(f"{stack.url}/health", timeout=10))
        return gateway_error(answers[-1], 502, "bad_gateway")

    wait_until("502 bad_gateway from the gateway", bad_gateway, 30)
    check(
        all(
            gateway_error(answer, 502, "bad_gateway")
            or gateway_error(answer, 504, "gateway_timeout")
            for answer in answers
        ),
        "with the Image Service stopped: JSON 502 bad_gateway"
        f" ({[answer.status_code for answer in answers]})",
    )


def sr28_folder(work: Path) -> Path:
    """Another copy of SR28: USDA_SR28_DIR on the host (which must exist), else the repository's
    copy unpacked into ``work`` as USDA publishes it."""
    named = os.environ.get("USDA_SR28_DIR", "").strip()
    if named:
        if not Path(named).is_dir():
            raise ImageTestFailure(f"USDA_SR28_DIR={named} is not a folder")
        return Path(named).resolve()
    folder = unpack_sr28(BUNDLED_SR28, work / "usda-sr28")
    for path in (folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the container's user
    return folder


def check_bundled_table(stack: Stack, token: str) -> None:
    """With no setting, the table the image carries is loaded and answers /foods and /nutrition."""
    health = requests.get(f"{stack.url}/health", timeout=5).json()["checks"]
    check(
        health["nutrition"] == f"usda-sr28 (8790 foods, bundled, {bundled_identity()})",
        f"the image's own SR28 table is loaded: nutrition {health['nutrition']!r}",
    )
    check_table_answers(stack, token)


def bundled_identity() -> str:
    """The identity of the repository's SR28 copy, as the service names it."""
    return NutritionTable.load(BUNDLED_SR28).identity


def check_nutrition_stack(stack: Stack, token: str, folder: Path) -> None:
    """Another SR28 folder mounted read-only and loaded; /foods and /nutrition answered from it."""
    table = NutritionTable.load(folder)
    health = requests.get(f"{stack.url}/health", timeout=5).json()["checks"]
    check(
        health["nutrition"]
        == f"usda-sr28 ({table.food_count} foods, USDA_SR28_DIR, {table.identity})",
        f"the mounted copy is loaded: nutrition {health['nutrition']!r}",
    )
    container = stack.compose("ps", "-q", "image-service").strip()
    mounts = docker(
        "inspect", "-f", "{{range .Mounts}}{{.Destination}}:{{.RW}} {{end}}", container
    ).split()
    check("/srv/usda-sr28:false" in mounts, f"the SR28 folder is mounted read-only ({mounts})")
    check_table_answers(stack, token)


def check_table_answers(stack: Stack, token: str) -> None:
    """GET /foods and POST /nutrition answered from the loaded table, through the gateway."""
    auth = {"Authorization": f"Bearer {token}"}
    foods = requests.get(f"{stack.url}/foods", params={"q": "salmon"}, headers=auth, timeout=5)
    found = foods.json().get("foods", []) if foods.ok else []
    check(
        foods.status_code == 200 and bool(found),
        f"GET /foods?q=salmon through the gateway: {foods.status_code}, {len(found)} foods",
    )
    counted = requests.post(
        f"{stack.url}/nutrition",
        json={"items": [{"name": "grilled salmon", "grams": 150}]},
        headers=auth,
        timeout=5,
    )
    check(
        counted.status_code == 200 and counted.json()["source"] == "usda-sr28",
        f"POST /nutrition counts 150 g of grilled salmon: {counted.status_code}"
        f" {counted.json().get('analysis', {}).get('calories')} kcal",
    )
    first = analyze(stack, token, photo())
    check(
        first.status_code == 200 and first.json()["source"] in ("api", "cache"),
        f"an analysis with the table: {first.status_code}",
    )


def check_logs(*log_files: Path) -> None:
    """No container of the stack warned about its init."""
    logs = "".join(log_file.read_text() for log_file in log_files if log_file.exists())
    check(TINI_WARNING not in logs and "[WARN  tini" not in logs, "no tini warning in any log")


# ---------------------------------------------------------------- main


def gateway_image() -> str:
    """The gateway's image, as docker-compose.yml pins it."""
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return str(compose["services"]["gateway"]["image"])


def main() -> int:
    """Run every check; 0 when all pass."""
    if shutil.which("docker") is None:
        print("image-test: needs the docker command and a running engine", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="image-test-"))
    work.chmod(0o755)
    secrets_dir = work / "secrets"
    started = time.monotonic()
    try:
        write_secrets(secrets_dir)
        docker(
            "run",
            "--rm",
            "-v",
            f"{ROOT / 'deploy' / 'nginx.conf'}:/etc/nginx/nginx.conf:ro",
            gateway_image(),
            "nginx",
            "-t",
        )
        check(True, f"nginx -t accepts deploy/nginx.conf in {gateway_image()}")
        say("building the image (docker build)")
        docker("build", "-t", IMAGE, ".", timeout=1200)
        check(True, f"docker build -t {IMAGE} . succeeded")
        check_image_alone(secrets_dir)
        token = token_for(secrets_dir)
        with running_stack(secrets_dir, work / "compose.log") as stack:
            check_stack(stack, token)
        folder = sr28_folder(work)
        files = (SR28_OVERRIDE,)
        log_file = work / "compose-sr28.log"
        with running_stack(secrets_dir, log_file, files, USDA_SR28_DIR=str(folder)) as stack:
            check_nutrition_stack(stack, token, folder)
        check_logs(work / "compose.log", work / "compose-sr28.log")
    except (ImageTestFailure, subprocess.SubprocessError, requests.RequestException) as error:
        print(f"image-test: FAILED: {error}", file=sys.stderr)
        for log_file in (work / "compose.log", work / "compose-sr28.log"):
            if log_file.exists():
                print(log_file.read_text()[-6000:], file=sys.stderr)
        return 1
    finally:
        subprocess.run(["docker", "rm", "-f", CONTAINER], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    say(f"all checks passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
