"""The service as deployed: gunicorn, /metrics, the image, the compose stack and its gateway."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from flask.testing import FlaskClient

from app import REQUEST_ID_PATTERN, Config
from nutrition import BUNDLED_SR28
from tests import images
from tests.conftest import analyze_over_socket as analyze
from tests.conftest import bearer, running_gunicorn
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer

MODEL_DELAY = 2.0
ROOT = Path(__file__).resolve().parents[1]
ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
# The errors the gateway answers itself: nginx's status, the status sent, the code in the body.
GATEWAY_ERRORS = [
    (400, 400, "bad_request"),
    (413, 413, "payload_too_large"),
    (414, 414, "uri_too_long"),
    (494, 431, "header_too_large"),
    (500, 500, "internal_error"),
    (502, 502, "bad_gateway"),
    (504, 504, "gateway_timeout"),
]


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


# ---------------------------------------------------------------- the gateway, the image, compose


@dataclasses.dataclass
class Block:
    """One nginx block (or the whole file): its directives in order, and the blocks it holds."""

    name: str
    args: tuple[str, ...] = ()
    directives: list[tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=list)
    blocks: list[Block] = dataclasses.field(default_factory=list)

    def values(self, name: str) -> list[tuple[str, ...]]:
        """The arguments of every directive `name` directly in this block."""
        return [args for directive, args in self.directives if directive == name]

    def value(self, name: str) -> str:
        """The single argument of the one directive `name` directly in this block."""
        (args,) = self.values(name)
        (value,) = args
        return value

    def value_pair(self, name: str) -> tuple[str, str]:
        """The two arguments of the one directive `name` directly in this block."""
        (args,) = self.values(name)
        first, second = args
        return first, second

    def block(self, name: str, *args: str) -> Block:
        """The one block directly in this one with that name and arguments."""
        (found,) = [block for block in self.blocks if (block.name, block.args) == (name, args)]
        return found


def parse_nginx(text: str) -> Block:
    """nginx's configuration syntax: words, quoted strings, `;`, `{`, `}`, `#` comments."""
    tokens = re.findall(
        r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"|([;{}])|#[^\n]*|([^\s;{}#'\"]+)", text
    )
    root = Block("main")
    stack = [root]
    words: list[str] = []
    for single, double, punctuation, word in tokens:
        if single or double:
            words.append(re.sub(r"\\(.)", lambda m: ESCAPES.get(m[1], m[1]), single or double))
        elif word:
            words.append(word)
        elif punctuation == ";":
            stack[-1].directives.append((words[0], tuple(words[1:])))
            words = []
        elif punctuation == "{":
            block = Block(words[0], tuple(words[1:]))
            stack[-1].blocks.append(block)
            stack.append(block)
            words = []
        elif punctuation == "}":
            stack.pop()
    assert len(stack) == 1, "unbalanced braces"
    assert not words, "a directive without its semicolon at the end"
    return root


def seconds(value: str) -> float:
    """An nginx time: 5s, 3m, 180."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, None: 1, "s": 1, "m": 60, "h": 3600}[unit]


def size_bytes(value: str) -> int:
    """An nginx size: 10m, 72k, 512."""
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]


def gateway_error_body(nginx: Block, page: str) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of one of the gateway's own error pages."""
    errors = nginx.block("http").block("server").block("location", "/_gateway_errors/")
    status, body = errors.block("location", "=", page).value_pair("return")
    return int(status), json.loads(body)


def gunicorn_settings(tmp_path: Path) -> dict[str, Any]:
    """gunicorn.conf.py's values with the default environment, read in a process of its own."""
    script = (
        "import json, runpy; settings = runpy.run_path('gunicorn.conf.py');"
        " settings['on_exit'](None);"
        " print(json.dumps({name: settings[name] for name in"
        " ('timeout', 'limit_request_field_size', 'bind')}))"
    )
    # HOME too: the default embedded store is made in the user's state folder at start.
    environment = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    output = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True,
        text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    settings: dict[str, Any] = json.loads(output)
    return settings


@pytest.fixture(scope="module")
def nginx() -> Block:
    """deploy/nginx.conf, parsed."""
    return parse_nginx(NGINX_CONF.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed."""
    parsed: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return parsed


def test_gateway_takes_bodies_up_to_max_upload_mb(nginx: Block) -> None:
    http = nginx.block("http")
    limit = size_bytes(http.value("client_max_body_size"))

    assert limit == Config().max_upload_bytes
    _, answer = gateway_error_body(nginx, "/_gateway_errors/413")
    assert f"larger than {Config().max_upload_mb:g} MB" in answer["error"]


def test_gateway_waits_for_the_longest_request_gunicorn_allows(
    nginx: Block, tmp_path: Path
) -> None:
    proxy = nginx.block("http").block("server").block("location", "/")
    read_timeout = seconds(proxy.value("proxy_read_timeout"))

    assert read_timeout > Config().worst_request_seconds
    assert read_timeout > gunicorn_settings(tmp_path)["timeout"]


def test_gateway_reads_each_request_whole_within_a_few_seconds(nginx: Block) -> None:
    http = nginx.block("http")
    proxy = http.block("server").block("location", "/")

    assert proxy.value("proxy_request_buffering") == "on"
    assert proxy.value("proxy_buffering") == "on"
    assert 1 <= seconds(http.value("client_header_timeout")) <= 10
    assert 1 <= seconds(http.value("client_body_timeout")) <= 10
    assert "proxy_intercept_errors" not in [name for name, _ in proxy.directives]


def test_gateway_header_lines_reach_gunicorn_up_to_its_own_limit(
    nginx: Block, tmp_path: Path
) -> None:
    (args,) = nginx.block("http").values("large_client_header_buffers")

    assert size_bytes(args[1]) == gunicorn_settings(tmp_path)["limit_request_field_size"]


def test_gateway_passes_a_sane_request_id_and_makes_one_otherwise(nginx: Block) -> None:
    http = nginx.block("http")
    request_id_map = http.block("map", "$http_x_request_id", "$gateway_request_id")
    proxy = http.block("server").block("location", "/")

    patterns = dict(request_id_map.directives)
    assert patterns == {
        f"~^{REQUEST_ID_PATTERN.pattern}$": ("$http_x_request_id",),
        "default": ("$request_id",),
    }
    assert ("X-Request-ID", "$gateway_request_id") in proxy.values("proxy_set_header")


@pytest.mark.parametrize(("nginx_status", "status", "code"), GATEWAY_ERRORS)
def test_gateway_answers_its_own_errors_as_json(
    nginx: Block, nginx_status: int, status: int, code: str
) -> None:
    server = nginx.block("http").block("server")
    pages = {args[0]: args[1:] for args in server.values("error_page")}
    errors = server.block("location", "/_gateway_errors/")

    returned_status, answer = gateway_error_body(nginx, pages[str(nginx_status)][-1])
    assert returned_status == status
    assert answer["code"] == code
    assert answer["error"]
    assert errors.values("internal") == [()]
    assert ("X-Request-ID", "$gateway_request_id", "always") in errors.values("add_header")


def test_gateway_keeps_metrics_off_the_public_side(nginx: Block) -> None:
    metrics = nginx.block("http").block("server").block("location", "=", "/metrics")

    status, body = metrics.value_pair("return")
    assert (int(status), json.loads(body)["code"]) == (404, "not_found")
    assert ("X-Request-ID", "$gateway_request_id", "always") in metrics.values("add_header")


def test_gateway_listens_where_compose_publishes_it_and_proxies_to_the_service(
    nginx: Block, compose: dict[str, Any], tmp_path: Path
) -> None:
    server = nginx.block("http").block("server")
    gateway = compose["services"]["gateway"]
    service_port = gunicorn_settings(tmp_path)["bind"].rsplit(":", 1)[1]

    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+(-[a-z0-9.]+)?", gateway["image"])
    assert server.values("listen") == [("8080", "default_server")]
    assert gateway["ports"] == ["${GATEWAY_PORT:-8080}:8080"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in gateway["volumes"]
    assert server.values("set") == [("$image_service", f"http://image-service:{service_port}")]
    assert server.block("location", "/").value("proxy_pass") == "$image_service"


def test_only_the_gateway_is_published(compose: dict[str, Any]) -> None:
    published = [name for name, service in compose["services"].items() if "ports" in service]

    assert published == ["gateway"]


def test_every_container_has_exactly_one_init(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.*)$", dockerfile, flags=re.MULTILINE)
    image_has_tini = json.loads(entrypoint)[0].endswith("/tini")

    for name, service in compose["services"].items():
        own_image = "build" in service
        assert service.get("init", False) is not (own_image and image_has_tini), name
    assert image_has_tini


def test_dockerfile_builds_without_a_remote_frontend_and_names_its_base_once() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    instructions = [line for line in lines if line and not line.startswith(("#", " "))]

    assert not any(re.match(r"#\s*syntax\s*=", line, flags=re.IGNORECASE) for line in lines)
    assert instructions[0] == "ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm"
    stages = [line for line in instructions if line.startswith("FROM ")]
    assert stages == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE} AS runtime"]


def local_modules(path: Path) -> set[str]:
    """The repository's own top-level modules that a file imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    names |= {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    return {name for name in names if (ROOT / f"{name}.py").is_file()}


def test_the_image_carries_every_module_gunicorn_imports() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {
        path.name
        for line in re.findall(r"^COPY (?!--from)(.*) \./$", dockerfile, flags=re.MULTILINE)
        for pattern in line.split()
        if not pattern.startswith("--")
        for path in ROOT.glob(pattern)
    }
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    needed = {"gunicorn.conf.py", "app.py", "openapi.yaml"}
    for module in ("app.py", "gunicorn.conf.py"):
        needed |= {f"{name}.py" for name in local_modules(ROOT / module)}

    assert "nutrition.py" in needed
    assert needed <= copied, needed - copied
    assert not needed & ignored
    assert "data" in ignored  # the downloaded SR28 files are mounted, never copied


def test_the_image_carries_the_bundled_sr28_table_where_the_service_looks_for_it() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR (\S+)$", dockerfile, flags=re.MULTILINE)[-1]
    copies = re.findall(r"^COPY (?!--from)(\S+) (\S+)$", dockerfile, flags=re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()

    assert BUNDLED_SR28 == ROOT / "usda-sr28"
    assert ("usda-sr28/", "./usda-sr28/") in copies
    assert workdir == "/app"  # beside nutrition.py, as BUNDLED_SR28 expects
    assert not any(line.strip().rstrip("/") == "usda-sr28" for line in ignored)


def test_the_sr28_override_mounts_the_folder_read_only_where_the_service_reads_it() -> None:
    override: dict[str, Any] = yaml.safe_load(
        (ROOT / "deploy" / "compose.nutrition.yml").read_text()
    )
    service = override["services"]["image-service"]
    (volume,) = service["volumes"]

    assert set(override["services"]) == {"image-service"}
    assert volume["target"] == service["environment"]["USDA_SR28_DIR"]
    assert volume["type"] == "bind"
    assert volume["read_only"] is True
    assert volume["bind"]["create_host_path"] is False
    assert volume["source"] == "${USDA_SR28_DIR:-./data/usda-sr28}"
