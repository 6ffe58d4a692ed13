"""Fixtures: an app built from a test Config, the real collaborators it talks to, and the
calls a test makes to the service (through the test client, or over gunicorn's socket)."""

from __future__ import annotations

import atexit
import base64
import dataclasses
import io
import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app import CACHE_PREFIX, Config, create_app
from nutrition import BUNDLED_SR28, NutritionTable, unpack_sr28
from tests import images
from tests.fakes import (
    ChatCompletionsServer,
    RedisServer,
    Reply,
    StalledServer,
    UserServiceServer,
)
from tests.open_food_facts import OpenFoodFactsServer
from tests.servers import STARTUP_TIMEOUT, Gunicorn, start_gunicorn

REDIS_PASSWORD = "redis-test-pw-Kq8zT3"
# Each configured environment gets an embedded store of its own here, never a shared default.
STORE_DIR = Path(tempfile.mkdtemp(prefix="image-service-test-stores-"))
atexit.register(shutil.rmtree, STORE_DIR, ignore_errors=True)
OPENAI_API_KEY = "openai-test-key-Vb71Pw0x"
JWT_SECRET = "jwt-test-secret-4f9c2a7e1b3d5f60718293a4b5c6d7e8"
# Long enough for HS512 (64 bytes), so PyJWT does not warn about a short key.
LONG_SECRET = "jwt-long-test-secret-" + "0123456789abcdef" * 4
MEAL = images.jpeg(64, 48)
# USDA's SR28 files as USDA publishes them, unpacked (checksums checked) from the repository's copy.
SR28 = unpack_sr28(BUNDLED_SR28, STORE_DIR.parent / f"{STORE_DIR.name}-usda-sr28")
atexit.register(shutil.rmtree, SR28, ignore_errors=True)
REQUEST_TIMEOUT = 10.0  # seconds, one request over gunicorn's socket


@pytest.fixture(scope="session")
def sr28_dir() -> Path:
    """USDA's SR28 files, unpacked from the repository's own copy."""
    return SR28


@pytest.fixture(scope="session")
def table(sr28_dir: Path) -> NutritionTable:
    """The real SR28 table, loaded once for the session."""
    return NutritionTable.load(sr28_dir)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One password-protected redis-server of the tests' own, on a free port."""
    server = RedisServer(password=REDIS_PASSWORD)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The tests' Redis, running and empty."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flush()
    return redis_server


@pytest.fixture(scope="session")
def model_server() -> Iterator[ChatCompletionsServer]:
    """A Chat Completions server on loopback."""
    with ChatCompletionsServer() as server:
        yield server


@pytest.fixture
def model(model_server: ChatCompletionsServer) -> ChatCompletionsServer:
    """The model server, with its default answer and an empty record."""
    model_server.reset()
    return model_server


@pytest.fixture(scope="session")
def user_service_server() -> Iterator[UserServiceServer]:
    """A User Service on loopback."""
    with UserServiceServer() as server:
        yield server


@pytest.fixture
def user_service(user_service_server: UserServiceServer) -> UserServiceServer:
    """The User Service, answering 201 and with an empty record."""
    user_service_server.reset()
    return user_service_server


def base_environment(
    redis: RedisServer | None, model: ChatCompletionsServer, user_service: UserServiceServer
) -> dict[str, str]:
    """The environment of a fully configured service pointing at the tests' collaborators."""
    env = {
        "OPENAI_API_KEY": OPENAI_API_KEY,
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_API_TIMEOUT": "2",
        "OPENAI_RETRY_INITIAL_WAIT": "0",
        "OPENAI_RETRY_MAX_WAIT": "0",
        "USER_SERVICE_URL": user_service.url,
        "USER_SERVICE_TIMEOUT": "2",
        "JWT_SECRET": JWT_SECRET,
        "STARTUP_GRACE_SECONDS": "0",
        "LOG_LEVEL": "DEBUG",
        "STORE_PATH": str(STORE_DIR / f"{uuid.uuid4().hex}.sqlite3"),
        # The model's own numbers: the tests of counting from SR28 turn it on themselves.
        "NUTRITION_SOURCE": "model",
        # No product lookups: the tests of packaged food point them at a loopback server.
        "OPENFOODFACTS_URL": "",
    }
    if redis is not None:
        env.update(
            REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis.port), REDIS_PASSWORD=REDIS_PASSWORD
        )
    return env


@pytest.fixture(scope="session")
def open_food_facts_server() -> Iterator[OpenFoodFactsServer]:
    """One loopback Open Food Facts for the session."""
    with OpenFoodFactsServer() as server:
        yield server


@pytest.fixture
def open_food_facts(open_food_facts_server: OpenFoodFactsServer) -> OpenFoodFactsServer:
    """The loopback Open Food Facts, knowing only its sample products, with nothing recorded."""
    open_food_facts_server.reset()
    return open_food_facts_server


@pytest.fixture
def stalled() -> Iterator[StalledServer]:
    """A port that accepts connections and never answers: a hung Redis."""
    with StalledServer() as server:
        yield server


def slow_answer(model: ChatCompletionsServer, delay: float) -> Reply:
    """The default analysis, answered after ``delay`` seconds."""
    return dataclasses.replace(model.completion(json.dumps(model.analysis)), delay=delay)


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """An empty folder of secret files, standing in for /run/secrets."""
    folder = tmp_path / "secrets"
    folder.mkdir()
    return folder


@pytest.fixture
def make_config(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> Callable[..., Config]:
    """Build a Config for the tests' collaborators; keyword arguments override fields."""
    secrets_dir = tmp_path / "no-secrets"
    secrets_dir.mkdir()

    def build(*, with_redis: bool = True, **overrides: Any) -> Config:
        env = base_environment(redis if with_redis else None, model, user_service)
        config = Config.from_env(env, secrets_dir)
        return dataclasses.replace(config, **overrides)

    return build


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    """The default test Config: Redis, model and User Service all up."""
    return make_config()


def app_for(config: Config) -> Flask:
    """An app built from this Config, in testing mode."""
    flask_app = create_app(config)
    flask_app.testing = True
    return flask_app


@pytest.fixture
def app(config: Config) -> Flask:
    """An app built from the test Config."""
    return app_for(config)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client for the app."""
    return app.test_client()


@pytest.fixture
def client_with(make_config: Callable[..., Config]) -> Callable[..., FlaskClient]:
    """A test client for an app whose Config differs from the default by some fields."""

    def build(**overrides: Any) -> FlaskClient:
        return app_for(make_config(**overrides)).test_client()

    return build


def post_photo(
    client: FlaskClient,
    headers: Mapping[str, str],
    data: bytes,
    query: str = "",
    form: Mapping[str, Any] | None = None,
    **options: Any,
) -> TestResponse:
    """POST one photo (and any other form fields) to /analyze-food as a multipart upload."""
    return client.post(
        f"/analyze-food{query}",
        data={"image": (io.BytesIO(data), "meal.jpg"), **(form or {})},
        headers=dict(headers),
        content_type="multipart/form-data",
        **options,
    )


def json_answer(client: FlaskClient, headers: Mapping[str, str], photo: bytes) -> dict[str, Any]:
    """POST one photo to /analyze-food; the JSON answer, which must be a 200."""
    response = post_photo(client, headers, photo)
    assert response.status_code == 200, response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    return body


class AnalyzeActions:
    """What a signed-in caller does with /analyze-food, through the test client.

    Like flaskr's ``AuthActions``: built on the test client and the test token, so a test reads
    ``api.analyze(photo, save=True)``; ``client=`` sends through another app's client.
    """

    def __init__(self, client: FlaskClient, headers: Mapping[str, str]) -> None:
        self.client = client
        self.headers = dict(headers)

    def analyze(
        self,
        photo: bytes = MEAL,
        *,
        save: bool = False,
        query: str = "",
        form: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        client: FlaskClient | None = None,
        **options: Any,
    ) -> TestResponse:
        """POST the photo; ``save`` adds ``save=true``; ``headers`` replace the token's."""
        if save:
            query = f"{query}&save=true" if query else "?save=true"
        return post_photo(
            client or self.client,
            self.headers if headers is None else headers,
            photo,
            query,
            form,
            **options,
        )


@pytest.fixture
def api(client: FlaskClient, auth_headers: dict[str, str]) -> AnalyzeActions:
    """/analyze-food as user-42 calls it: ``api.analyze(photo, save=..., query=..., form=...)``."""
    return AnalyzeActions(client, auth_headers)


def cached_keys(redis: RedisServer) -> list[bytes]:
    """Every analysis key in the tests' Redis."""
    with redis.client() as connection:
        return sorted(connection.scan_iter(match=f"{CACHE_PREFIX}*"))


def assert_json_error(response: TestResponse, status: int, code: str) -> None:
    """The contract's error: JSON with a message and a stable code."""
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["code"] == code
    assert isinstance(body["error"], str)
    assert body["error"]


@pytest.fixture
def make_token() -> Callable[..., str]:
    """Sign a token with the test secret; claims override the defaults, None drops one."""

    def sign(secret: str = JWT_SECRET, algorithm: str = "HS256", **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"sub": "user-42", "type": "access", "iat": now, "exp": now + 600}
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(payload, secret, algorithm=algorithm)

    return sign


@pytest.fixture
def auth_headers(make_token: Callable[..., str]) -> dict[str, str]:
    """An Authorization header with a valid access token for user-42."""
    return {"Authorization": f"Bearer {make_token()}"}


class RecordHandler(logging.Handler):
    """Keeps the rendered lines the service logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s [%(request_id)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        """Every line so far, joined."""
        return "\n".join(self.lines)


@pytest.fixture
def logs(app: Flask) -> Iterator[RecordHandler]:
    """The lines the service logs during the test."""
    handler = RecordHandler()
    service_logger = logging.getLogger("image_service")
    service_logger.addHandler(handler)
    try:
        yield handler
    finally:
        service_logger.removeHandler(handler)


# ------------------------------------------------------------------ tokens built by hand


def as_bearer(token: str) -> str:
    """An Authorization header value for this token."""
    return f"Bearer {token}"


def post_with_authorization(
    client: FlaskClient, authorization: str | None = None, query: str = ""
) -> TestResponse:
    """POST a small valid JPEG to /analyze-food with this Authorization header, if any."""
    headers = {} if authorization is None else {"Authorization": authorization}
    return post_photo(client, headers, MEAL, query)


def unsigned_token(claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """A JWT built by hand: base64url header and payload, and an empty signature."""

    def part(value: dict[str, Any]) -> str:
        raw = json.dumps(value, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    return f"{part(header or {'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def assert_unauthorized(response: TestResponse, code: str, *never_shown: str) -> None:
    """A contract 401: JSON error with this code, a Bearer challenge, and no token or secret."""
    assert response.status_code == 401
    assert response.headers.get("WWW-Authenticate") == "Bearer"
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["code"] == code
    assert isinstance(body["error"], str)
    assert body["error"]
    text = response.get_data(as_text=True)
    for value in (JWT_SECRET, LONG_SECRET, *never_shown):
        if value:
            assert value not in text


# ------------------------------------------------------------------ gunicorn over a socket


@contextmanager
def running_gunicorn(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    workdir: Path,
    **overrides: str | None,
) -> Iterator[Gunicorn]:
    """`gunicorn app:app` serving the tests' collaborators, live; it never outlives the block.

    One worker with four threads unless ``overrides`` say otherwise; a None override removes
    a variable, leaving gunicorn.conf.py's default.
    """
    settings = {
        **base_environment(redis, model, user_service),
        "GUNICORN_WORKERS": "1",
        "GUNICORN_THREADS": "4",
        **overrides,
    }
    server = start_gunicorn("app:app", workdir, settings)
    try:
        server.wait_until_live(time.monotonic() + STARTUP_TIMEOUT)
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def served(
    redis_server: RedisServer,
    model_server: ChatCompletionsServer,
    user_service_server: UserServiceServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gunicorn]:
    """One real gunicorn with gunicorn.conf.py's defaults per test module."""
    workdir = tmp_path_factory.mktemp("gunicorn-served")
    with running_gunicorn(redis_server, model_server, user_service_server, workdir) as server:
        yield server


def bearer(user_id: str = "user-42") -> dict[str, str]:
    """An Authorization header with a fresh access token signed with the tests' secret."""
    now = int(time.time())
    claims = {"sub": user_id, "type": "access", "iat": now, "exp": now + 600}
    return {"Authorization": as_bearer(jwt.encode(claims, JWT_SECRET, algorithm="HS256"))}


def analyze_over_socket(
    server: Gunicorn, photo: bytes, *, headers: dict[str, str] | None = None, **params: str
) -> requests.Response:
    """POST a photo to /analyze-food through gunicorn's socket."""
    return server.session.post(
        f"{server.url}/analyze-food",
        params=params,
        files={"image": ("meal.jpg", photo, "image/jpeg")},
        headers=bearer() if headers is None else headers,
        timeout=REQUEST_TIMEOUT,
    )
