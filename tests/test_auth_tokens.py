"""Bearer tokens against RFC 8725: foreign algorithms, oversized and malformed tokens, public keys
(RS256, ES256, EdDSA) never mixed with HS ones, and the start-up warning about a short secret.

What tests/test_auth.py already covers (alg none, another key, HS512, exp, nbf, sub, type, aud,
iss, the Basic scheme, an empty Bearer) is not repeated here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from flask.testing import FlaskClient

from app import MAX_TOKEN_LENGTH, MIN_HS_SECRET_BYTES, Config, ConfigError, create_app
from tests.conftest import (
    JWT_SECRET,
    RecordHandler,
    app_for,
    as_bearer,
    assert_unauthorized,
    base_environment,
    post_with_authorization,
    unsigned_token,
)
from tests.fakes import ChatCompletionsServer, UserServiceServer

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
WEAK_SECRET_WARNING = f"shorter than {MIN_HS_SECRET_BYTES} bytes"


# ---------------------------------------------------------------------------- keys and tokens


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    """One private key per public-key algorithm, and a second RSA key nobody configured."""
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
        "other-RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


def public_pem(private_key: PrivateKey) -> str:
    """The PEM (SubjectPublicKeyInfo) of a private key's public half."""
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(private_key: PrivateKey) -> str:
    """The unencrypted PKCS#8 PEM of a private key."""
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def claims(**overrides: Any) -> dict[str, Any]:
    """An access token's claims for user-42, valid for ten minutes; None drops a claim."""
    now = int(time.time())
    values: dict[str, Any] = {"sub": "user-42", "type": "access", "iat": now, "exp": now + 600}
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def b64url(raw: bytes) -> str:
    """Unpadded base64url, as JWS segments are written."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def hs256_signed(payload: bytes, key: bytes, header: dict[str, Any] | None = None) -> str:
    """A compact JWS over any payload bytes, signed by hand with HMAC-SHA256."""
    header_part = b64url(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header_part}.{b64url(payload)}".encode()
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return f"{signing_input.decode()}.{b64url(signature)}"


def signed_with_secret(payload: bytes) -> str:
    """Payload bytes (JSON or not) signed with the service's own secret."""
    return hs256_signed(payload, JWT_SECRET.encode())


def token_of_length(length: int) -> str:
    """A valid HS256 access token padded (a claim, and a kid header) to exactly `length` chars."""
    for kid_length in range(4):
        headers = {"kid": "k" * kid_length} if kid_length else None

        def sign(pad: int, headers: dict[str, str] | None = headers) -> str:
            return jwt.encode(claims(pad="x" * pad), JWT_SECRET, "HS256", headers=headers)

        first = max(0, (length - len(sign(0))) * 3 // 4 - 8)
        for pad in range(first, first + 16):
            token = sign(pad)
            if len(token) == length:
                return token
    raise AssertionError(f"no token of exactly {length} characters could be built")


# ---------------------------------------------------------------------------- apps


@pytest.fixture
def environment(model: ChatCompletionsServer, user_service: UserServiceServer) -> dict[str, str]:
    """The fully configured service's environment (HS256 secret, in-memory cache)."""
    return base_environment(None, model, user_service)


@pytest.fixture
def public_key_client(
    environment: dict[str, str], secrets_dir: Path, keys: dict[str, PrivateKey]
) -> Callable[[str], FlaskClient]:
    """A client for an app verifying `algorithm` with the public half of its test key."""

    def build(algorithm: str) -> FlaskClient:
        env = {
            **environment,
            "JWT_PUBLIC_KEY": public_pem(keys[algorithm]),
            "JWT_ALGORITHMS": algorithm,
        }
        return app_for(Config.from_env(env, secrets_dir)).test_client()

    return build


@pytest.fixture
def rs256_client(public_key_client: Callable[[str], FlaskClient]) -> FlaskClient:
    """An app that takes RS256 tokens only, with JWT_SECRET also set (and unused)."""
    return public_key_client("RS256")


@pytest.fixture
def start_logs() -> Iterator[RecordHandler]:
    """The lines the service logs, attached before an app is built so start-up is included."""
    handler = RecordHandler()
    service_logger = logging.getLogger("image_service")
    service_logger.addHandler(handler)
    try:
        yield handler
    finally:
        service_logger.removeHandler(handler)


# ---------------------------------------------------------------------------- algorithms


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_public_key_token_is_rejected_when_only_hs256_is_allowed(
    client: FlaskClient,
    keys: dict[str, PrivateKey],
    model: ChatCompletionsServer,
    algorithm: str,
) -> None:
    token = jwt.encode(claims(), keys[algorithm], algorithm=algorithm)

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)
    assert model.calls == []


@pytest.mark.parametrize("spelling", ["None", "NONE", "nOnE"])
def test_alg_none_in_any_spelling_is_rejected(client: FlaskClient, spelling: str) -> None:
    token = unsigned_token(claims(), header={"alg": spelling, "typ": "JWT"})

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)


def test_unknown_critical_header_is_rejected(client: FlaskClient) -> None:
    header = {"alg": "HS256", "typ": "JWT", "crit": ["x-tenant"], "x-tenant": "acme"}
    token = hs256_signed(json.dumps(claims()).encode(), JWT_SECRET.encode(), header)

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)


# ---------------------------------------------------------------------------- size


def test_validly_signed_64_kb_token_is_invalid_token(
    client: FlaskClient, model: ChatCompletionsServer
) -> None:
    token = jwt.encode(claims(roles=["cook"] * 8000), JWT_SECRET, algorithm="HS256")
    assert len(token) >= 64 * 1024

    response = post_with_authorization(client, as_bearer(token))

    assert_unauthorized(response, "invalid_token")
    assert str(MAX_TOKEN_LENGTH) in response.get_json()["error"]
    assert model.calls == []


def test_token_of_exactly_the_maximum_length_is_accepted(client: FlaskClient) -> None:
    token = token_of_length(MAX_TOKEN_LENGTH)

    response = post_with_authorization(client, as_bearer(token))

    assert response.status_code == 200


def test_token_one_character_over_the_maximum_length_is_invalid_token(
    client: FlaskClient,
) -> None:
    token = token_of_length(MAX_TOKEN_LENGTH + 1)

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token")


# ---------------------------------------------------------------------------- malformed tokens

MALFORMED_TOKENS: dict[str, Callable[[], str]] = {
    "header-not-json": lambda: f"{b64url(b'not json')}.{b64url(b'{}')}.{b64url(b'sig')}",
    "header-a-list": lambda: f"{b64url(b'[]')}.{b64url(b'{}')}.{b64url(b'sig')}",
    "two-segments": lambda: f"{b64url(b'{}')}.{b64url(b'{}')}",
    "four-segments": lambda: signed_with_secret(json.dumps(claims()).encode()) + ".extra",
    "only-dots": lambda: "..",
    "not-base64": lambda: "***.***.***",
    "non-ascii": lambda: "\u00e9\u00e8\u00ea.\u00e0\u00e2.\u00f4",
    "payload-not-json": lambda: signed_with_secret(b"not json at all"),
    "payload-a-list": lambda: signed_with_secret(b'["user-42"]'),
    "payload-a-string": lambda: signed_with_secret(b'"user-42"'),
    "exp-a-string": lambda: signed_with_secret(json.dumps(claims(exp="tomorrow")).encode()),
    "exp-infinity": lambda: signed_with_secret(b'{"sub": "user-42", "exp": Infinity}'),
    "exp-nan": lambda: signed_with_secret(b'{"sub": "user-42", "exp": NaN}'),
    "exp-null": lambda: signed_with_secret(b'{"sub": "user-42", "exp": null}'),
    "nbf-a-string": lambda: signed_with_secret(json.dumps(claims(nbf="now")).encode()),
    "sub-a-number": lambda: signed_with_secret(json.dumps(claims(sub=42)).encode()),
    "sub-an-object": lambda: signed_with_secret(json.dumps(claims(sub={"id": 1})).encode()),
    "sub-empty": lambda: signed_with_secret(json.dumps(claims(sub="")).encode()),
    "user-id-true": lambda: signed_with_secret(json.dumps(claims(sub=None, user_id=True)).encode()),
    "user-id-a-list": lambda: signed_with_secret(
        json.dumps(claims(sub=None, user_id=["user-42"])).encode()
    ),
    "type-a-list": lambda: signed_with_secret(json.dumps(claims(type=["access"])).encode()),
}


@pytest.mark.parametrize("make", MALFORMED_TOKENS.values(), ids=MALFORMED_TOKENS.keys())
def test_malformed_token_is_a_json_401(
    client: FlaskClient, model: ChatCompletionsServer, make: Callable[[], str]
) -> None:
    token = make()

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)
    assert model.calls == []


# ---------------------------------------------------------------------------- public keys


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_token_signed_with_the_configured_key_pair_is_accepted(
    public_key_client: Callable[[str], FlaskClient],
    keys: dict[str, PrivateKey],
    algorithm: str,
) -> None:
    token = jwt.encode(claims(), keys[algorithm], algorithm=algorithm)

    response = post_with_authorization(public_key_client(algorithm), as_bearer(token))

    assert response.status_code == 200


def test_public_key_on_one_line_with_escaped_newlines_is_used(
    environment: dict[str, str], secrets_dir: Path, keys: dict[str, PrivateKey]
) -> None:
    one_line = public_pem(keys["RS256"]).strip().replace("\n", "\\n")
    env = {**environment, "JWT_PUBLIC_KEY": one_line, "JWT_ALGORITHMS": "RS256"}
    client = app_for(Config.from_env(env, secrets_dir)).test_client()

    response = post_with_authorization(
        client, as_bearer(jwt.encode(claims(), keys["RS256"], algorithm="RS256"))
    )

    assert response.status_code == 200


def test_public_key_from_the_secret_file_is_used(
    environment: dict[str, str], secrets_dir: Path, keys: dict[str, PrivateKey]
) -> None:
    (secrets_dir / "jwt_public_key").write_text(public_pem(keys["ES256"]) + "\n")
    env = {**environment, "JWT_ALGORITHMS": "ES256"}
    client = app_for(Config.from_env(env, secrets_dir)).test_client()

    response = post_with_authorization(
        client, as_bearer(jwt.encode(claims(), keys["ES256"], algorithm="ES256"))
    )

    assert response.status_code == 200


def test_public_key_secret_file_wins_over_the_variable(
    environment: dict[str, str], secrets_dir: Path, keys: dict[str, PrivateKey]
) -> None:
    (secrets_dir / "jwt_public_key").write_text(public_pem(keys["RS256"]))
    env = {
        **environment,
        "JWT_PUBLIC_KEY": public_pem(keys["other-RS256"]),
        "JWT_ALGORITHMS": "RS256",
    }
    client = app_for(Config.from_env(env, secrets_dir)).test_client()

    response = post_with_authorization(
        client, as_bearer(jwt.encode(claims(), keys["RS256"], algorithm="RS256"))
    )

    assert response.status_code == 200


def test_token_signed_with_another_private_key_is_rejected(
    rs256_client: FlaskClient, keys: dict[str, PrivateKey]
) -> None:
    token = jwt.encode(claims(), keys["other-RS256"], algorithm="RS256")

    assert_unauthorized(
        post_with_authorization(rs256_client, as_bearer(token)), "invalid_token", token
    )


def test_hs256_token_keyed_with_the_public_key_text_is_rejected(
    rs256_client: FlaskClient, keys: dict[str, PrivateKey], model: ChatCompletionsServer
) -> None:
    # The classic key confusion: an attacker knows the public PEM and uses it as an HMAC secret.
    token = hs256_signed(json.dumps(claims()).encode(), public_pem(keys["RS256"]).encode())

    assert_unauthorized(
        post_with_authorization(rs256_client, as_bearer(token)), "invalid_token", token
    )
    assert model.calls == []


def test_hs256_token_keyed_with_jwt_secret_is_rejected_when_public_keys_are_configured(
    rs256_client: FlaskClient,
) -> None:
    token = jwt.encode(claims(), JWT_SECRET, algorithm="HS256")

    assert_unauthorized(
        post_with_authorization(rs256_client, as_bearer(token)), "invalid_token", token
    )


def test_key_embedded_in_the_token_header_is_not_trusted(
    rs256_client: FlaskClient, keys: dict[str, PrivateKey]
) -> None:
    attacker = keys["other-RS256"]
    embedded = jwt.algorithms.RSAAlgorithm.to_jwk(attacker.public_key(), as_dict=True)
    token = jwt.encode(claims(), attacker, algorithm="RS256", headers={"jwk": embedded})

    assert_unauthorized(
        post_with_authorization(rs256_client, as_bearer(token)), "invalid_token", token
    )


def test_public_key_algorithm_outside_the_allow_list_is_rejected(
    public_key_client: Callable[[str], FlaskClient], keys: dict[str, PrivateKey]
) -> None:
    token = jwt.encode(claims(), keys["RS256"], algorithm="RS256")

    assert_unauthorized(
        post_with_authorization(public_key_client("ES256"), as_bearer(token)), "invalid_token"
    )


def test_expired_token_is_token_expired_with_a_public_key(
    rs256_client: FlaskClient, keys: dict[str, PrivateKey]
) -> None:
    now = int(time.time())
    token = jwt.encode(claims(iat=now - 1200, exp=now - 600), keys["RS256"], algorithm="RS256")

    assert_unauthorized(
        post_with_authorization(rs256_client, as_bearer(token)), "token_expired", token
    )


def test_public_key_algorithms_without_a_key_reject_every_token(
    environment: dict[str, str], secrets_dir: Path, keys: dict[str, PrivateKey]
) -> None:
    client = app_for(
        Config.from_env({**environment, "JWT_ALGORITHMS": "RS256"}, secrets_dir)
    ).test_client()
    token = jwt.encode(claims(), keys["RS256"], algorithm="RS256")

    assert_unauthorized(post_with_authorization(client, as_bearer(token)), "invalid_token", token)


# ---------------------------------------------------------------------------- refused settings


def test_public_key_with_hs_algorithms_is_a_config_error(
    environment: dict[str, str], secrets_dir: Path, keys: dict[str, PrivateKey]
) -> None:
    env = {**environment, "JWT_PUBLIC_KEY": public_pem(keys["RS256"]), "JWT_ALGORITHMS": "HS256"}

    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY"):
        Config.from_env(env, secrets_dir)


def test_public_key_with_hs_and_rs_algorithms_mixed_is_a_config_error(
    environment: dict[str, str], secrets_dir: Path, keys: dict[str, PrivateKey]
) -> None:
    env = {
        **environment,
        "JWT_PUBLIC_KEY": public_pem(keys["RS256"]),
        "JWT_ALGORITHMS": "RS256,HS256",
    }

    with pytest.raises(ConfigError, match="JWT_ALGORITHMS"):
        Config.from_env(env, secrets_dir)


@pytest.mark.parametrize(
    ("key_name", "algorithm"),
    [("ES256", "RS256"), ("RS256", "ES256"), ("RS256", "EdDSA"), ("EdDSA", "PS256")],
)
def test_public_key_that_cannot_verify_the_algorithm_is_a_config_error(
    environment: dict[str, str],
    secrets_dir: Path,
    keys: dict[str, PrivateKey],
    key_name: str,
    algorithm: str,
) -> None:
    env = {**environment, "JWT_PUBLIC_KEY": public_pem(keys[key_name]), "JWT_ALGORITHMS": algorithm}

    with pytest.raises(ConfigError, match=f"cannot verify {algorithm}"):
        Config.from_env(env, secrets_dir)


def test_text_that_is_not_a_pem_key_is_a_config_error_naming_jwt_public_key(
    environment: dict[str, str], secrets_dir: Path
) -> None:
    env = {**environment, "JWT_PUBLIC_KEY": "ssh-rsa AAAAB3NzaC1yc2E", "JWT_ALGORITHMS": "RS256"}

    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY"):
        Config.from_env(env, secrets_dir)


def test_private_key_given_as_jwt_public_key_is_refused_without_echoing_it(
    environment: dict[str, str], secrets_dir: Path, keys: dict[str, PrivateKey]
) -> None:
    pem = private_pem(keys["RS256"])
    env = {**environment, "JWT_PUBLIC_KEY": pem, "JWT_ALGORITHMS": "RS256"}

    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY") as raised:
        Config.from_env(env, secrets_dir)

    key_lines = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    assert not any(line in str(raised.value) for line in key_lines)


# ---------------------------------------------------------------------------- short secret


def test_secret_shorter_than_32_bytes_logs_a_warning_at_start(
    make_config: Callable[..., Config], start_logs: RecordHandler
) -> None:
    create_app(make_config(jwt_secret="s" * (MIN_HS_SECRET_BYTES - 1)))

    warnings = [line for line in start_logs.lines if line.startswith("WARNING")]
    assert any(WEAK_SECRET_WARNING in line for line in warnings)


@pytest.mark.parametrize(
    "secret",
    ["s" * MIN_HS_SECRET_BYTES, "\u043a\u043b\u044e\u0447" * (MIN_HS_SECRET_BYTES // 8)],
    ids=["32-ascii-characters", "16-cyrillic-characters-32-bytes"],
)
def test_secret_of_32_bytes_logs_no_warning(
    make_config: Callable[..., Config], start_logs: RecordHandler, secret: str
) -> None:
    assert len(secret.encode()) == MIN_HS_SECRET_BYTES

    create_app(make_config(jwt_secret=secret))

    assert WEAK_SECRET_WARNING not in start_logs.text()


def test_short_secret_warning_does_not_show_the_secret(
    make_config: Callable[..., Config], start_logs: RecordHandler
) -> None:
    secret = "tiny-Secret-9x"

    create_app(make_config(jwt_secret=secret))

    assert WEAK_SECRET_WARNING in start_logs.text()
    assert secret not in start_logs.text()


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_short_secret_still_verifies_tokens(make_config: Callable[..., Config]) -> None:
    secret = "tiny-Secret-9x"
    client = app_for(make_config(jwt_secret=secret)).test_client()

    response = post_with_authorization(
        client, as_bearer(jwt.encode(claims(), secret, algorithm="HS256"))
    )

    assert response.status_code == 200


def test_short_unused_secret_is_not_warned_about_when_public_keys_are_configured(
    environment: dict[str, str],
    secrets_dir: Path,
    keys: dict[str, PrivateKey],
    start_logs: RecordHandler,
) -> None:
    env = {
        **environment,
        "JWT_SECRET": "tiny-Secret-9x",
        "JWT_PUBLIC_KEY": public_pem(keys["RS256"]),
        "JWT_ALGORITHMS": "RS256",
    }

    create_app(Config.from_env(env, secrets_dir))

    assert WEAK_SECRET_WARNING not in start_logs.text()
