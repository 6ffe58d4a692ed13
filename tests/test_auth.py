"""Bearer JWT authentication on POST /analyze-food, seen through HTTP as a caller sees it."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from app import Config
from tests.conftest import (
    LONG_SECRET,
    app_for,
    as_bearer,
    assert_unauthorized,
    base_environment,
    post_with_authorization,
    unsigned_token,
)
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer

OTHER_SECRET = "another-key-that-the-service-does-not-know-1234567890"

MakeToken = Callable[..., str]


# ---------------------------------------------------------------------------- the header


def test_missing_header_is_missing_token(client: FlaskClient, model: ChatCompletionsServer) -> None:
    response = post_with_authorization(client)

    assert_unauthorized(response, "missing_token")
    assert model.calls == []


def test_bearer_without_a_token_is_missing_token(client: FlaskClient) -> None:
    assert_unauthorized(post_with_authorization(client, "Bearer"), "missing_token")


def test_bearer_with_only_spaces_is_missing_token(client: FlaskClient) -> None:
    assert_unauthorized(post_with_authorization(client, "Bearer    "), "missing_token")


def test_basic_scheme_is_invalid_token(client: FlaskClient) -> None:
    credentials = base64.b64encode(b"user-42:password").decode()

    assert_unauthorized(
        post_with_authorization(client, f"Basic {credentials}"), "invalid_token", credentials
    )


def test_token_without_a_scheme_is_invalid_token(
    client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token()

    assert_unauthorized(post_with_authorization(client, token), "invalid_token", token)


def test_bearer_scheme_is_case_insensitive(client: FlaskClient, make_token: MakeToken) -> None:
    response = post_with_authorization(client, f"bearer {make_token()}")

    assert response.status_code == 200


# ---------------------------------------------------------------------------- the signature


def test_valid_token_is_accepted(client: FlaskClient, make_token: MakeToken) -> None:
    response = post_with_authorization(client, as_bearer(make_token()))

    assert response.status_code == 200
    assert response.get_json()["source"] == "api"


def test_garbage_token_is_invalid_token(client: FlaskClient, model: ChatCompletionsServer) -> None:
    token = "not.a-jwt.at-all"

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)
    assert model.calls == []


def test_token_signed_with_another_key_is_invalid_token(
    client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token(secret=OTHER_SECRET)

    assert_unauthorized(
        post_with_authorization(client, as_bearer(token)), "invalid_token", token, OTHER_SECRET
    )


def test_token_with_a_tampered_payload_is_invalid_token(
    client: FlaskClient, make_token: MakeToken
) -> None:
    header, _, signature = make_token(sub="user-42").split(".")
    forged_payload = unsigned_token({"sub": "admin", "exp": int(time.time()) + 600}).split(".")[1]
    token = f"{header}.{forged_payload}.{signature}"

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)


def test_alg_none_token_is_invalid_token(client: FlaskClient, model: ChatCompletionsServer) -> None:
    token = unsigned_token({"sub": "user-42", "type": "access", "exp": int(time.time()) + 600})

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)
    assert model.calls == []


def test_hs512_token_is_rejected_when_only_hs256_is_allowed(
    make_config: Callable[..., Config], make_token: MakeToken
) -> None:
    client = app_for(make_config(jwt_secret=LONG_SECRET)).test_client()
    token = make_token(secret=LONG_SECRET, algorithm="HS512")

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)


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
    client = app_for(Config.from_env(env, tmp_path)).test_client()

    response = post_with_authorization(
        client, as_bearer(make_token(secret=LONG_SECRET, algorithm="HS512"))
    )

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
    client = app_for(Config.from_env(env, tmp_path)).test_client()
    token = make_token(secret=LONG_SECRET, algorithm="HS256")

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)


def test_no_jwt_secret_configured_rejects_every_token(
    make_config: Callable[..., Config], make_token: MakeToken, model: ChatCompletionsServer
) -> None:
    client = app_for(make_config(jwt_secret=None)).test_client()
    token = make_token()

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)
    assert model.calls == []


# ---------------------------------------------------------------------------- time claims


def test_expired_token_is_token_expired(client: FlaskClient, make_token: MakeToken) -> None:
    now = int(time.time())
    token = make_token(iat=now - 1200, exp=now - 600)

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "token_expired", token)


def test_token_without_exp_is_invalid_token(client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token(exp=None)

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)


def test_token_not_valid_yet_is_invalid_token(client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token(nbf=int(time.time()) + 600)

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)


# ---------------------------------------------------------------------------- the user


def test_token_without_sub_or_user_id_is_invalid_token(
    client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token(sub=None)

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)


def test_sub_is_forwarded_as_the_user_id(
    client: FlaskClient, make_token: MakeToken, user_service: UserServiceServer
) -> None:
    response = post_with_authorization(
        client, as_bearer(make_token(sub="user-77")), query="?save=true"
    )

    assert response.status_code == 200
    assert user_service.calls[-1].json()["userId"] == "user-77"


def test_user_id_claim_is_used_when_sub_is_absent(
    client: FlaskClient, make_token: MakeToken, user_service: UserServiceServer
) -> None:
    response = post_with_authorization(
        client, as_bearer(make_token(sub=None, user_id="user-from-claim")), query="?save=true"
    )

    assert response.status_code == 200
    assert user_service.calls[-1].json()["userId"] == "user-from-claim"


def test_sub_wins_over_user_id(
    client: FlaskClient, make_token: MakeToken, user_service: UserServiceServer
) -> None:
    token = make_token(sub="user-from-sub", user_id="user-from-claim")

    post_with_authorization(client, as_bearer(token), query="?save=true")

    assert user_service.calls[-1].json()["userId"] == "user-from-sub"


# ---------------------------------------------------------------------------- token type


@pytest.mark.parametrize("claim", ["type", "token_type"])
def test_refresh_token_is_rejected(
    client: FlaskClient, make_token: MakeToken, model: ChatCompletionsServer, claim: str
) -> None:
    claims: dict[str, Any] = {"type": None}
    claims[claim] = "refresh"
    token = make_token(**claims)

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)
    assert model.calls == []


@pytest.mark.parametrize("claim", ["type", "token_type"])
def test_access_token_type_is_accepted(
    client: FlaskClient, make_token: MakeToken, claim: str
) -> None:
    claims: dict[str, Any] = {"type": None}
    claims[claim] = "access"

    response = post_with_authorization(client, as_bearer(make_token(**claims)))

    assert response.status_code == 200


def test_token_without_a_type_is_accepted(client: FlaskClient, make_token: MakeToken) -> None:
    response = post_with_authorization(client, as_bearer(make_token(type=None)))

    assert response.status_code == 200


def test_refresh_token_type_is_rejected_even_beside_type_access(
    client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token(type="access", token_type="refresh")

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)


# ---------------------------------------------------------------------------- audience, issuer


AUDIENCE = "food-tracker-api"
ISSUER = "https://auth.food-tracker.example"


@pytest.fixture
def audience_client(make_config: Callable[..., Config]) -> FlaskClient:
    """An app that requires JWT_AUDIENCE."""
    return app_for(make_config(jwt_audience=AUDIENCE)).test_client()


@pytest.fixture
def issuer_client(make_config: Callable[..., Config]) -> FlaskClient:
    """An app that requires JWT_ISSUER."""
    return app_for(make_config(jwt_issuer=ISSUER)).test_client()


def test_right_audience_is_accepted(audience_client: FlaskClient, make_token: MakeToken) -> None:
    response = post_with_authorization(audience_client, as_bearer(make_token(aud=AUDIENCE)))

    assert response.status_code == 200


def test_wrong_audience_is_invalid_token(
    audience_client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token(aud="some-other-api")

    assert_unauthorized(
        post_with_authorization(audience_client, as_bearer(token)), "invalid_token", token
    )


def test_missing_audience_is_invalid_token(
    audience_client: FlaskClient, make_token: MakeToken
) -> None:
    token = make_token()

    assert_unauthorized(
        post_with_authorization(audience_client, as_bearer(token)), "invalid_token", token
    )


def test_audience_in_token_is_ignored_when_jwt_audience_is_unset(
    client: FlaskClient, make_token: MakeToken
) -> None:
    response = post_with_authorization(client, as_bearer(make_token(aud="whatever-api")))

    assert response.status_code == 200


def test_right_issuer_is_accepted(issuer_client: FlaskClient, make_token: MakeToken) -> None:
    response = post_with_authorization(issuer_client, as_bearer(make_token(iss=ISSUER)))

    assert response.status_code == 200


def test_wrong_issuer_is_invalid_token(issuer_client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token(iss="https://evil.example")

    assert_unauthorized(
        post_with_authorization(issuer_client, as_bearer(token)), "invalid_token", token
    )


def test_missing_issuer_is_invalid_token(issuer_client: FlaskClient, make_token: MakeToken) -> None:
    token = make_token()

    assert_unauthorized(
        post_with_authorization(issuer_client, as_bearer(token)), "invalid_token", token
    )


def test_audience_and_issuer_together_are_accepted_when_both_match(
    make_config: Callable[..., Config], make_token: MakeToken
) -> None:
    client = app_for(make_config(jwt_audience=AUDIENCE, jwt_issuer=ISSUER)).test_client()

    response = post_with_authorization(client, as_bearer(make_token(aud=AUDIENCE, iss=ISSUER)))

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
