"""Bearer JWT authentication on POST /analyze-food, seen through HTTP as a caller sees it."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app import Config, create_app
from tests import images
from tests.conftest import JWT_SECRET, base_environment
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer

# Long enough for HS512 (64 bytes), so PyJWT does not warn about a short key.
LONG_SECRET = "jwt-long-test-secret-" + "0123456789abcdef" * 4
OTHER_SECRET = "another-key-that-the-service-does-not-know-1234567890"

MakeToken = Callable[..., str]


def build_client(config: Config) -> FlaskClient:
    """A test client for an app built from this Config."""
    flask_app: Flask = create_app(config)
    flask_app.testing = True
    return flask_app.test_client()


def analyze(client: FlaskClient, authorization: str | None = None, query: str = "") -> TestResponse:
    """POST a small valid JPEG to /analyze-food with this Authorization header, if any."""
    headers = {} if authorization is None else {"Authorization": authorization}
    return client.post(
        f"/analyze-food{query}",
        data={"image": (io.BytesIO(images.jpeg(64, 48)), "meal.jpg")},
        headers=headers,
    )


def bearer(token: str) -> str:
    """An Authorization header value for this token."""
    return f"Bearer {token}"


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


# ---------------------------------------------------------------------------- the header


def test_missing_header_is_missing_token(client: FlaskClient, model: ChatCompletionsServer) -> None:
    response = analyze(client)

    assert_unauthorized(response, "missing_token")
    assert model.calls == []


def test_bearer_without_a_token_is_missing_token(client: FlaskClient) -> None:
    assert_unauthorized(analyze(client, "Bearer"), "missing_token")


def test_bearer_with_only_spaces_is_missing_token(client: FlaskClient) -> None:
    assert_unauthorized(analyze(client, "Bearer    "), "missing_token")


def test_basic_scheme_is_invalid_token(client: FlaskClient) -> None:
    credentials = base64.b64encode(b"user-42:password").decode()

    assert_unauthorized(analyze(client, f"Basic {credentials}"), "invalid_token", credentials)


def test_token_without_a_scheme_is_invalid_token(
    client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token()

    assert_unauthorized(analyze(client, token), "invalid_token", token)


def test_bearer_scheme_is_case_insensitive(client: FlaskClient, make_token: MakeToken) -> None:
    response = analyze(client, f"bearer {make_token()}")

    assert response.status_code == 200


# ---------------------------------------------------------------------------- the signature


def test_valid_token_is_accepted(client: FlaskClient, make_token: MakeToken) -> None:
    response = analyze(client, bearer(make_token()))

    assert response.status_code == 200
    assert response.get_json()["source"] == "api"


def test_garbage_token_is_invalid_token(client: FlaskClient, model: ChatCompletionsServer) -> None:
    token = "not.a-jwt.at-all"

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)
    assert model.calls == []


def test_token_signed_with_another_key_is_invalid_token(
    client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token(secret=OTHER_SECRET)

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token, OTHER_SECRET)


def test_token_with_a_tampered_payload_is_invalid_token(
    client: FlaskClient, make_token: MakeToken
) -> None:
    header, _, signature = make_token(sub="user-42").split(".")
    forged_payload = unsigned_token({"sub": "admin", "exp": int(time.time()) + 600}).split(".")[1]
    token = f"{header}.{forged_payload}.{signature}"

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)


def test_alg_none_token_is_invalid_token(client: FlaskClient, model: ChatCompletionsServer) -> None:
    token = unsigned_token({"sub": "user-42", "type": "access", "exp": int(time.time()) + 600})

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)
    assert model.calls == []


def test_hs512_token_is_rejected_when_only_hs256_is_allowed(
    make_config: Callable[..., Config], make_token: MakeToken
) -> None:
    client = build_client(make_config(jwt_secret=LONG_SECRET))
    token = make_token(secret=LONG_SECRET, algorithm="HS512")

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)


def test_jwt_algorithms_variable_allows_hs512(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
    make_token: MakeToken,
) -> None:
    env = {
        **base_environment(redis, model, user_service),
        "JWT_SECRET": LONG_SECRET,
        "JWT_ALGORITHMS": "HS384,HS512",
    }
    client = build_client(Config.from_env(env, tmp_path))

    response = analyze(client, bearer(make_token(secret=LONG_SECRET, algorithm="HS512")))

    assert response.status_code == 200


def test_jwt_algorithms_variable_drops_hs256(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
    make_token: MakeToken,
) -> None:
    env = {
        **base_environment(redis, model, user_service),
        "JWT_SECRET": LONG_SECRET,
        "JWT_ALGORITHMS": "HS384,HS512",
    }
    client = build_client(Config.from_env(env, tmp_path))
    token = make_token(secret=LONG_SECRET, algorithm="HS256")

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)


def test_no_jwt_secret_configured_rejects_every_token(
    make_config: Callable[..., Config], make_token: MakeToken, model: ChatCompletionsServer
) -> None:
    client = build_client(make_config(jwt_secret=None))
    token = make_token()

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)
    assert model.calls == []


# ---------------------------------------------------------------------------- time claims


def test_expired_token_is_token_expired(client: FlaskClient, make_token: MakeToken) -> None:
    now = int(time.time())
    token = make_token(iat=now - 1200, exp=now - 600)

    assert_unauthorized(analyze(client, bearer(token)), "token_expired", token)


def test_token_without_exp_is_invalid_token(client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token(exp=None)

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)


def test_token_not_valid_yet_is_invalid_token(client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token(nbf=int(time.time()) + 600)

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)


# ---------------------------------------------------------------------------- the user


def test_token_without_sub_or_user_id_is_invalid_token(
    client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token(sub=None)

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)


def test_sub_is_forwarded_as_the_user_id(
    client: FlaskClient, make_token: MakeToken, user_service: UserServiceServer
) -> None:
    response = analyze(client, bearer(make_token(sub="user-77")), query="?save=true")

    assert response.status_code == 200
    assert user_service.calls[-1].json()["userId"] == "user-77"


def test_user_id_claim_is_used_when_sub_is_absent(
    client: FlaskClient, make_token: MakeToken, user_service: UserServiceServer
) -> None:
    response = analyze(
        client, bearer(make_token(sub=None, user_id="user-from-claim")), query="?save=true"
    )

    assert response.status_code == 200
    assert user_service.calls[-1].json()["userId"] == "user-from-claim"


def test_sub_wins_over_user_id(
    client: FlaskClient, make_token: MakeToken, user_service: UserServiceServer
) -> None:
    token = make_token(sub="user-from-sub", user_id="user-from-claim")

    analyze(client, bearer(token), query="?save=true")

    assert user_service.calls[-1].json()["userId"] == "user-from-sub"


# ---------------------------------------------------------------------------- token type


@pytest.mark.parametrize("claim", ["type", "token_type"])
def test_refresh_token_is_rejected(
    client: FlaskClient, make_token: MakeToken, model: ChatCompletionsServer, claim: str
) -> None:
    claims: dict[str, Any] = {"type": None}
    claims[claim] = "refresh"
    token = make_token(**claims)

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)
    assert model.calls == []


@pytest.mark.parametrize("claim", ["type", "token_type"])
def test_access_token_type_is_accepted(
    client: FlaskClient, make_token: MakeToken, claim: str
) -> None:
    claims: dict[str, Any] = {"type": None}
    claims[claim] = "access"

    response = analyze(client, bearer(make_token(**claims)))

    assert response.status_code == 200


def test_token_without_a_type_is_accepted(client: FlaskClient, make_token: MakeToken) -> None:
    response = analyze(client, bearer(make_token(type=None)))

    assert response.status_code == 200


def test_refresh_token_type_is_rejected_even_beside_type_access(
    client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token(type="access", token_type="refresh")

    assert_unauthorized(analyze(client, bearer(token)), "invalid_token", token)


# ---------------------------------------------------------------------------- audience, issuer


AUDIENCE = "food-tracker-api"
ISSUER = "https://auth.food-tracker.example"


@pytest.fixture
def audience_client(make_config: Callable[..., Config]) -> FlaskClient:
    """An app that requires JWT_AUDIENCE."""
    return build_client(make_config(jwt_audience=AUDIENCE))


@pytest.fixture
def issuer_client(make_config: Callable[..., Config]) -> FlaskClient:
    """An app that requires JWT_ISSUER."""
    return build_client(make_config(jwt_issuer=ISSUER))


def test_right_audience_is_accepted(audience_client: FlaskClient, make_token: MakeToken) -> None:
    response = analyze(audience_client, bearer(make_token(aud=AUDIENCE)))

    assert response.status_code == 200


def test_wrong_audience_is_invalid_token(
    audience_client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token(aud="some-other-api")

    assert_unauthorized(analyze(audience_client, bearer(token)), "invalid_token", token)


def test_missing_audience_is_invalid_token(
    audience_client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token()

    assert_unauthorized(analyze(audience_client, bearer(token)), "invalid_token", token)


def test_audience_in_token_is_ignored_when_jwt_audience_is_unset(
    client: FlaskClient, make_token: MakeToken
) -> None:
    response = analyze(client, bearer(make_token(aud="whatever-api")))

    assert response.status_code == 200


def test_right_issuer_is_accepted(issuer_client: FlaskClient, make_token: MakeToken) -> None:
    response = analyze(issuer_client, bearer(make_token(iss=ISSUER)))

    assert response.status_code == 200


def test_wrong_issuer_is_invalid_token(issuer_client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token(iss="https://evil.example")

    assert_unauthorized(analyze(issuer_client, bearer(token)), "invalid_token", token)


def test_missing_issuer_is_invalid_token(issuer_client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token()

    assert_unauthorized(analyze(issuer_client, bearer(token)), "invalid_token", token)


def test_audience_and_issuer_together_are_accepted_when_both_match(
    make_config: Callable[..., Config], make_token: MakeToken
) -> None:
    client = build_client(make_config(jwt_audience=AUDIENCE, jwt_issuer=ISSUER))

    response = analyze(client, bearer(make_token(aud=AUDIENCE, iss=ISSUER)))

    assert response.status_code == 200


# ---------------------------------------------------------------------------- probes


def test_health_needs_no_token(client: FlaskClient) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    assert response.get_json()["status"] == "healthy"


def test_liveness_needs_no_token(client: FlaskClient) -> None:
    response = client.get("/health/live")

    assert response.status_code == 200
    assert response.get_json() == {"status": "alive"}
