"""Config.from_env: defaults, every variable, secret files, bad values; and import without I/O."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from app import OPENFOODFACTS_USER_AGENT, SERVICE_VERSION, Config, ConfigError, create_app
from settings import bind_problem
from tests import images
from tests.conftest import REDIS_PASSWORD
from tests.fakes import ChatCompletionsServer, RedisServer, StalledServer, UserServiceServer

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 60  # a guard against a hung import, far above what an import takes

FILE_JWT_SECRET = "file-jwt-secret-9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"
FILE_OPENAI_API_KEY = "file-openai-key-Zq4Rt8Wm2Lp6"
SECRETS = [
    # (secret file, environment variable, Config field)
    ("redis_password", "REDIS_PASSWORD", "redis_password"),
    ("openai_api_key", "OPENAI_API_KEY", "openai_api_key"),
    ("jwt_secret", "JWT_SECRET", "jwt_secret"),
]


def subprocess_environment(secrets_dir: Path, **variables: str) -> dict[str, str]:
    """A clean environment for `python -c "import app"`: no inherited service settings."""
    return {"PATH": os.environ.get("PATH", ""), "SECRETS_DIR": str(secrets_dir), **variables}


def import_app(env: dict[str, str], code: str = "import app") -> subprocess.CompletedProcess[str]:
    """Import the service module in a fresh interpreter, from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


# ---------------------------------------------------------------------------- defaults


def test_defaults_match_the_contract(secrets_dir: Path) -> None:
    config = Config.from_env({}, secrets_dir)

    assert config.redis_url is None
    assert config.redis_host is None
    assert config.redis_port == 6379
    assert config.redis_db == 0
    assert config.redis_password is None
    assert config.openai_api_key is None
    assert config.openai_base_url == "https://api.openai.com/v1"
    assert config.openai_model == "gpt-6-luna"
    assert config.openai_api_timeout == 30
    assert config.openai_max_attempts == 3
    assert config.openai_image_detail == "auto"
    assert config.image_max_side == 1024
    assert config.cache_ttl_seconds == 3600
    assert config.user_service_url == "http://localhost:8082"
    assert config.user_service_timeout == 10
    assert config.jwt_secret is None
    assert config.jwt_algorithms == ("HS256",)
    assert config.jwt_audience is None
    assert config.jwt_issuer is None
    assert config.max_upload_mb == 25
    assert config.max_images == 5
    assert config.max_upload_bytes == 25 * 1024 * 1024
    assert config.startup_grace_seconds == 30
    assert config.cors_origins == ("*",)
    assert config.log_level == "INFO"


def test_secrets_dir_defaults_to_run_secrets() -> None:
    config = Config.from_env({}, None)

    assert config.secrets_dir == "/run/secrets"


def test_without_redis_settings_redis_is_not_configured(secrets_dir: Path) -> None:
    config = Config.from_env({}, secrets_dir)

    assert config.redis_configured is False


def test_without_an_api_key_the_model_is_not_configured(secrets_dir: Path) -> None:
    config = Config.from_env({}, secrets_dir)

    assert config.openai_configured is False


# ---------------------------------------------------------------------------- every variable


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        (
            "REDIS_URL",
            "rediss://cache.internal:6380/2",
            "redis_url",
            "rediss://cache.internal:6380/2",
        ),
        ("REDIS_HOST", "cache.internal", "redis_host", "cache.internal"),
        ("REDIS_PORT", "6380", "redis_port", 6380),
        ("REDIS_DB", "3", "redis_db", 3),
        ("REDIS_PASSWORD", "redis-pw-from-env", "redis_password", "redis-pw-from-env"),
        ("OPENAI_API_KEY", "sk-from-env", "openai_api_key", "sk-from-env"),
        ("OPENAI_BASE_URL", "http://ollama:11434/v1", "openai_base_url", "http://ollama:11434/v1"),
        ("OPENAI_BASE_URL", "http://vllm:8000/v1/", "openai_base_url", "http://vllm:8000/v1"),
        ("OPENAI_MODEL", "gpt-4o", "openai_model", "gpt-4o"),
        ("OPENAI_API_TIMEOUT", "12.5", "openai_api_timeout", 12.5),
        ("OPENAI_MAX_ATTEMPTS", "5", "openai_max_attempts", 5),
        ("OPENAI_IMAGE_DETAIL", "low", "openai_image_detail", "low"),
        ("OPENAI_IMAGE_DETAIL", "high", "openai_image_detail", "high"),
        ("IMAGE_MAX_SIDE", "512", "image_max_side", 512),
        ("CACHE_TTL_SECONDS", "60", "cache_ttl_seconds", 60),
        ("USER_SERVICE_URL", "http://users:8082", "user_service_url", "http://users:8082"),
        ("USER_SERVICE_TIMEOUT", "3", "user_service_timeout", 3),
        ("JWT_SECRET", "jwt-secret-from-env", "jwt_secret", "jwt-secret-from-env"),
        ("JWT_ALGORITHMS", "HS256, HS512", "jwt_algorithms", ("HS256", "HS512")),
        ("JWT_AUDIENCE", "food-tracker", "jwt_audience", "food-tracker"),
        ("JWT_ISSUER", "https://auth.example", "jwt_issuer", "https://auth.example"),
        ("MAX_UPLOAD_MB", "5", "max_upload_mb", 5),
        ("STARTUP_GRACE_SECONDS", "0", "startup_grace_seconds", 0),
        (
            "CORS_ORIGINS",
            "https://app.example, https://admin.example",
            "cors_origins",
            ("https://app.example", "https://admin.example"),
        ),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ],
)
def test_each_variable_is_read(
    secrets_dir: Path, variable: str, value: str, attribute: str, expected: Any
) -> None:
    config = Config.from_env({variable: value}, secrets_dir)

    assert getattr(config, attribute) == expected


def test_max_upload_mb_sets_the_byte_limit(secrets_dir: Path) -> None:
    config = Config.from_env({"MAX_UPLOAD_MB": "2"}, secrets_dir)

    assert config.max_upload_bytes == 2 * 1024 * 1024


def test_redis_host_makes_redis_configured(secrets_dir: Path) -> None:
    config = Config.from_env({"REDIS_HOST": "cache.internal"}, secrets_dir)

    assert config.redis_configured is True


def test_redis_url_wins_over_host_and_port(
    redis: RedisServer, model: ChatCompletionsServer, secrets_dir: Path
) -> None:
    with StalledServer() as wrong_redis:
        env = {
            "REDIS_URL": redis.url,
            "REDIS_HOST": wrong_redis.host,
            "REDIS_PORT": str(wrong_redis.port),
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": model.base_url,
            "STARTUP_GRACE_SECONDS": "0",
        }
        client = create_app(Config.from_env(env, secrets_dir)).test_client()

        response = client.get("/health")

        assert response.get_json()["checks"]["redis"] == "connected"
        assert wrong_redis.accepted == 0


# ---------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(("filename", "variable", "attribute"), SECRETS)
def test_secret_is_read_from_its_file(
    secrets_dir: Path, filename: str, variable: str, attribute: str
) -> None:
    (secrets_dir / filename).write_text("value-from-file")

    config = Config.from_env({}, secrets_dir)

    assert getattr(config, attribute) == "value-from-file"


@pytest.mark.parametrize(("filename", "variable", "attribute"), SECRETS)
def test_secret_file_whitespace_is_stripped(
    secrets_dir: Path, filename: str, variable: str, attribute: str
) -> None:
    (secrets_dir / filename).write_text("  \tvalue-from-file \n\n")

    config = Config.from_env({}, secrets_dir)

    assert getattr(config, attribute) == "value-from-file"


@pytest.mark.parametrize(("filename", "variable", "attribute"), SECRETS)
def test_secret_is_read_from_its_variable(
    secrets_dir: Path, filename: str, variable: str, attribute: str
) -> None:
    config = Config.from_env({variable: "value-from-variable"}, secrets_dir)

    assert getattr(config, attribute) == "value-from-variable"


@pytest.mark.parametrize(("filename", "variable", "attribute"), SECRETS)
def test_secret_file_wins_over_variable(
    secrets_dir: Path, filename: str, variable: str, attribute: str
) -> None:
    (secrets_dir / filename).write_text("value-from-file\n")

    config = Config.from_env({variable: "value-from-variable"}, secrets_dir)

    assert getattr(config, attribute) == "value-from-file"


def test_secrets_dir_is_taken_from_the_environment(secrets_dir: Path) -> None:
    (secrets_dir / "jwt_secret").write_text("jwt-from-secrets-dir\n")

    config = Config.from_env({"SECRETS_DIR": str(secrets_dir)}, None)

    assert config.secrets_dir == str(secrets_dir)
    assert config.jwt_secret == "jwt-from-secrets-dir"


def test_secrets_dir_argument_wins_over_the_environment(secrets_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-secrets"
    other.mkdir()
    (other / "jwt_secret").write_text("jwt-from-other-dir")
    (secrets_dir / "jwt_secret").write_text("jwt-from-argument-dir")

    config = Config.from_env({"SECRETS_DIR": str(other)}, secrets_dir)

    assert config.jwt_secret == "jwt-from-argument-dir"


def test_repr_shows_no_secret_value(secrets_dir: Path) -> None:
    env = {
        "REDIS_PASSWORD": "redis-pw-Secret-111",
        "OPENAI_API_KEY": "sk-Secret-222",
        "JWT_SECRET": "jwt-Secret-333",
    }

    text = repr(Config.from_env(env, secrets_dir))

    for secret in env.values():
        assert secret not in text


def test_repr_hides_a_password_inside_redis_url(secrets_dir: Path) -> None:
    config = Config.from_env({"REDIS_URL": "redis://:url-pw-Secret-444@cache:6379/0"}, secrets_dir)

    assert "url-pw-Secret-444" not in repr(config)


# ---------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OPENAI_API_TIMEOUT", "abc"),
        ("OPENAI_API_TIMEOUT", "-1"),
        ("OPENAI_API_TIMEOUT", "nan"),
        ("OPENAI_MAX_ATTEMPTS", "three"),
        ("OPENAI_IMAGE_DETAIL", "ultra"),
        ("JWT_ALGORITHMS", "none"),
        ("JWT_ALGORITHMS", "HS256,RS256"),
        ("JWT_ALGORITHMS", "HS256,none"),
        ("OPENAI_BASE_URL", "api.openai.com/v1"),
        ("USER_SERVICE_URL", "ftp://users:8082"),
        ("REDIS_PORT", "abc"),
        ("REDIS_PORT", "70000"),
        ("REDIS_DB", "-1"),
        ("IMAGE_MAX_SIDE", "big"),
        ("CACHE_TTL_SECONDS", "0"),
        ("USER_SERVICE_TIMEOUT", "soon"),
        ("MAX_UPLOAD_MB", "ten"),
        ("STARTUP_GRACE_SECONDS", "later"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_value_raises_config_error_naming_the_variable(
    secrets_dir: Path, variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        Config.from_env({variable: value}, secrets_dir)


def test_redis_url_without_a_redis_scheme_is_rejected(secrets_dir: Path) -> None:
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Config.from_env({"REDIS_URL": "cache.internal:6379"}, secrets_dir)


def test_every_bad_value_is_named_in_one_message(secrets_dir: Path) -> None:
    env = {
        "OPENAI_API_TIMEOUT": "abc",
        "OPENAI_IMAGE_DETAIL": "ultra",
        "JWT_ALGORITHMS": "none",
        "USER_SERVICE_URL": "not a url",
    }

    with pytest.raises(ConfigError) as raised:
        Config.from_env(env, secrets_dir)

    message = str(raised.value)
    for variable in env:
        assert variable in message


def test_config_error_does_not_echo_a_secret(secrets_dir: Path) -> None:
    env = {"JWT_SECRET": "jwt-Secret-555", "OPENAI_API_TIMEOUT": "abc"}

    with pytest.raises(ConfigError) as raised:
        Config.from_env(env, secrets_dir)

    assert "jwt-Secret-555" not in str(raised.value)


# ---------------------------------------------------------------------------- importing app


def test_importing_app_connects_nowhere(secrets_dir: Path) -> None:
    with StalledServer() as stalled_redis, StalledServer() as stalled_model:
        env = subprocess_environment(
            secrets_dir,
            REDIS_HOST=stalled_redis.host,
            REDIS_PORT=str(stalled_redis.port),
            OPENAI_BASE_URL=stalled_model.http_url,
        )

        result = import_app(env)

        assert result.returncode == 0, result.stderr
        assert stalled_redis.accepted == 0
        assert stalled_model.accepted == 0


def test_building_the_served_app_with_a_bad_value_fails_naming_it(secrets_dir: Path) -> None:
    environment = subprocess_environment(secrets_dir, OPENAI_API_TIMEOUT="abc")
    result = import_app(environment, "from app import app")

    assert result.returncode != 0
    assert "OPENAI_API_TIMEOUT" in result.stderr


def test_gunicorn_with_bad_values_prints_one_line_naming_each_and_exits(secrets_dir: Path) -> None:
    environment = subprocess_environment(
        secrets_dir, REDIS_TIMEOUT="abc", OPENAI_IMAGE_DETAIL="ultra", GUNICORN_WORKERS="two"
    )
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    result = subprocess.run(
        [gunicorn, "app:app"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )

    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    for variable in ("REDIS_TIMEOUT", "OPENAI_IMAGE_DETAIL", "GUNICORN_WORKERS"):
        assert variable in output
    assert "Traceback" not in output


# ---------------------------------------------------------------------------- missing secrets


@pytest.fixture
def unconfigured_client(
    model: ChatCompletionsServer, user_service: UserServiceServer, secrets_dir: Path
) -> FlaskClient:
    """An app with every setting but none of the three secrets."""
    env = {
        "OPENAI_BASE_URL": model.base_url,
        "USER_SERVICE_URL": user_service.url,
        "STARTUP_GRACE_SECONDS": "0",
        "STORE_PATH": str(secrets_dir.parent / "unconfigured-store.sqlite3"),
    }
    return create_app(Config.from_env(env, secrets_dir)).test_client()


def test_missing_api_key_shows_in_health(unconfigured_client: FlaskClient) -> None:
    response = unconfigured_client.get("/health")

    assert response.status_code == 503
    assert response.get_json()["status"] == "unhealthy"
    assert response.get_json()["checks"]["openai"] == "missing credentials"


def test_missing_jwt_secret_answers_401(
    unconfigured_client: FlaskClient,
    make_token: Callable[..., str],
    model: ChatCompletionsServer,
) -> None:
    response = unconfigured_client.post(
        "/analyze-food",
        data={"image": (io.BytesIO(images.jpeg(64, 48)), "meal.jpg")},
        headers={"Authorization": f"Bearer {make_token()}"},
    )

    assert response.status_code == 401
    assert response.get_json()["code"] == "invalid_token"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert model.calls == []


# ---------------------------------------------------------------------------- secrets from files


@pytest.fixture
def file_secrets_client(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    secrets_dir: Path,
) -> FlaskClient:
    """An app whose three secrets come only from files (with surrounding whitespace)."""
    (secrets_dir / "jwt_secret").write_text(f"{FILE_JWT_SECRET}\n")
    (secrets_dir / "openai_api_key").write_text(f"  {FILE_OPENAI_API_KEY}\n")
    (secrets_dir / "redis_password").write_text(f"{REDIS_PASSWORD}\n")
    env = {
        "REDIS_HOST": redis.host,
        "REDIS_PORT": str(redis.port),
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_RETRY_INITIAL_WAIT": "0",
        "OPENAI_RETRY_MAX_WAIT": "0",
        "USER_SERVICE_URL": user_service.url,
        "STARTUP_GRACE_SECONDS": "0",
    }
    return create_app(Config.from_env(env, secrets_dir)).test_client()


def post_meal(client: FlaskClient, token: str, photo: bytes) -> Any:
    """POST a photo to /analyze-food with a bearer token."""
    return client.post(
        "/analyze-food",
        data={"image": (io.BytesIO(photo), "meal.jpg")},
        headers={"Authorization": f"Bearer {token}"},
    )


def test_jwt_secret_file_verifies_tokens(
    file_secrets_client: FlaskClient, make_token: Callable[..., str]
) -> None:
    response = post_meal(file_secrets_client, make_token(secret=FILE_JWT_SECRET), images.jpeg())

    assert response.status_code == 200


def test_openai_api_key_file_is_sent_to_the_model(
    file_secrets_client: FlaskClient, make_token: Callable[..., str], model: ChatCompletionsServer
) -> None:
    post_meal(file_secrets_client, make_token(secret=FILE_JWT_SECRET), images.jpeg())

    assert model.calls[-1].header("Authorization") == f"Bearer {FILE_OPENAI_API_KEY}"


def test_redis_password_file_lets_the_cache_work(
    file_secrets_client: FlaskClient, make_token: Callable[..., str], redis: RedisServer
) -> None:
    post_meal(file_secrets_client, make_token(secret=FILE_JWT_SECRET), images.jpeg())

    with redis.client() as connection:
        assert list(connection.scan_iter(match="food_analysis:*")) != []


def test_redis_password_file_makes_health_connected(file_secrets_client: FlaskClient) -> None:
    response = file_secrets_client.get("/health")

    checks = response.get_json()["checks"]
    assert response.status_code == 200
    assert checks["redis"] == "connected"
    assert checks["openai"] == "configured"


@pytest.mark.parametrize(
    "settings",
    [
        {"REDIS_URL": "redis+sentinel://h1:abc/mymaster"},
        {"REDIS_URL": "redis+sentinel://h1:26379/mymaster/x"},
        {"REDIS_URL": "redis+sentinel://h1:26379"},
        {"REDIS_URL": "redis://cache:99999/0"},
        {"REDIS_URL": "redis://cache:6379/zero"},
        {"REDIS_URL": "unix:///run/redis.sock", "REDIS_CLUSTER": "true"},
        {"REDIS_URL": "redis://cache:6379/5", "REDIS_CLUSTER": "true"},
        {"REDIS_HOST": "cache", "REDIS_DB": "5", "REDIS_CLUSTER": "true"},
    ],
)
def test_a_redis_setting_that_cannot_connect_is_named(
    settings: dict[str, str], secrets_dir: Path
) -> None:
    with pytest.raises(ConfigError, match="REDIS_"):
        Config.from_env(settings, secrets_dir)


def test_a_redis_url_password_is_redacted_from_log_lines(
    make_config: Callable[..., Config],
) -> None:
    from app import LOG_FILTER

    create_app(make_config(redis_url="redis://:url-Secret-9876@127.0.0.1:1/0"))
    record = logging.LogRecord(
        "image_service", logging.INFO, __file__, 1, "%s", ("url-Secret-9876",), None
    )
    LOG_FILTER.filter(record)
    assert "url-Secret-9876" not in record.getMessage()


def test_a_stalled_sentinel_is_asked_once_per_call(
    make_config: Callable[..., Config],
) -> None:
    with StalledServer() as stalled:
        url = f"redis+sentinel://{stalled.host}:{stalled.port}/mymaster"
        client = create_app(make_config(redis_url=url, redis_timeout=0.2)).test_client()
        assert client.get("/health").get_json()["checks"]["redis"] == "connection failed"
        assert stalled.accepted == 1


# ---------------------------------------------------------------------------- numbers and addresses


NUMBER_WORDS = {
    "REDIS_PORT": "a whole number",
    "OPENAI_API_TIMEOUT": "a number",
    "STORE_MAX_MB": "a number",
}


# Arabic-Indic and fullwidth digits, which int() and float() read, and Python's digit grouping.
@pytest.mark.parametrize("value", ["\u0663", "\uff15", "1_0", "\uff11\uff10", "+\u0663"])
@pytest.mark.parametrize("variable", ["REDIS_PORT", "OPENAI_API_TIMEOUT", "STORE_MAX_MB"])
def test_numeric_settings_take_ascii_digits_only(
    secrets_dir: Path, variable: str, value: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env({variable: value}, secrets_dir)

    assert raised.value.problems == [f"{variable} must be {NUMBER_WORDS[variable]}, got {value!r}"]


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        ("REDIS_PORT", "+6380", "redis_port", 6380),
        ("OPENAI_API_TIMEOUT", "12.5", "openai_api_timeout", 12.5),
        ("OPENAI_API_TIMEOUT", ".5", "openai_api_timeout", 0.5),
        ("OPENAI_API_TIMEOUT", "7.", "openai_api_timeout", 7),
        ("STORE_MAX_MB", "0.5", "store_max_mb", 0.5),
    ],
)
def test_numeric_settings_in_ascii_decimal_are_read(
    secrets_dir: Path, variable: str, value: str, attribute: str, expected: float
) -> None:
    config = Config.from_env({variable: value}, secrets_dir)

    assert getattr(config, attribute) == expected


@pytest.mark.parametrize(
    "address",
    [
        "0.0.0.0:8083",
        "127.0.0.1:0",
        "127.0.0.1:1",
        "localhost:65535",
        "[::1]:8083",
        "[::]:8083",
        "tcp://127.0.0.1:8083",
        "127.0.0.1",
        "unix:/tmp/image-service.sock",
        "unix:///tmp/image-service.sock",
    ],
)
def test_bind_addresses_gunicorn_can_bind_are_taken(address: str) -> None:
    assert bind_problem("GUNICORN_BIND", address) is None


def test_an_inherited_socket_can_be_bound_and_another_descriptor_cannot(tmp_path: Path) -> None:
    with socket.socket() as listener, (tmp_path / "file").open("w") as other:
        assert bind_problem("GUNICORN_BIND", f"fd://{listener.fileno()}") is None
        assert bind_problem("GUNICORN_BIND", f"fd://{other.fileno()}") is not None


def test_a_unix_socket_path_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")

    problem = bind_problem("GUNICORN_BIND", f"unix:{tmp_path / 'taken'}")

    assert problem is not None
    assert "not a socket" in problem


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:99999",
        "127.0.0.1:",
        "127.0.0.1:\uff18\uff10\uff18\uff13",
        "127.0.0.1:80_83",
        "garbage",
        "no-such-host.invalid:8083",
        "[::1",
        "[::1]:99999",
        "[not-v6]:8083",
        "127.0.0.1:8083,127.0.0.1:8084",
        "unix:",
        "unix:/no/such/folder/image-service.sock",
        "fd://x",
        "fd://-1",
        "fd://987654",
    ],
)
def test_bind_addresses_gunicorn_cannot_bind_are_named(address: str) -> None:
    problem = bind_problem("GUNICORN_BIND", address)

    assert problem is not None
    assert problem.startswith("GUNICORN_BIND ")


def run_gunicorn(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`gunicorn app:app` from the repository root, until it exits."""
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    return subprocess.run(
        [gunicorn, "app:app"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "garbage"])
def test_gunicorn_with_a_bind_it_cannot_use_prints_one_line_and_exits_1(
    secrets_dir: Path, address: str
) -> None:
    result = run_gunicorn(subprocess_environment(secrets_dir, GUNICORN_BIND=address))

    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1
    assert len(output.splitlines()) == 1, output
    assert "GUNICORN_BIND" in output
    assert "Traceback" not in output


def test_gunicorn_with_non_ascii_digits_prints_one_line_and_exits_1(secrets_dir: Path) -> None:
    result = run_gunicorn(subprocess_environment(secrets_dir, GUNICORN_WORKERS="\u0662"))

    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1
    assert output.splitlines() == [
        "image-service: invalid configuration: "
        "GUNICORN_WORKERS must be a whole number, got '\u0662'"
    ]


def test_the_service_version_is_pyprojects() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["version"] == SERVICE_VERSION
    assert f"FoodTracker-ImageService/{SERVICE_VERSION}" == OPENFOODFACTS_USER_AGENT


def test_an_empty_openfoodfacts_url_turns_lookups_off_and_unset_keeps_the_default() -> None:
    assert Config.from_env({"OPENFOODFACTS_URL": ""}).openfoodfacts_url == ""
    assert Config.from_env({"OPENFOODFACTS_URL": "  "}).openfoodfacts_url == ""
    assert Config.from_env({}).openfoodfacts_url == "https://world.openfoodfacts.org"
    with pytest.raises(ConfigError, match="OPENFOODFACTS_URL"):
        Config.from_env({"OPENFOODFACTS_URL": "ftp://food"})
