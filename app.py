"""Image Service: turns a photo of a meal into nutrition (dish, calories, macros, portion).

``POST /analyze-food`` reads the photo, asks a vision model that speaks OpenAI's Chat Completions
API (unless the cache has the answer), and, when asked, saves the analysis as a food entry in the
User Service. ``GET /health`` and ``GET /health/live`` serve the probes.

The sections follow a request, as the README's "How it works" does; ``analyze_food`` reads as
those steps, each done here unless a module beside app.py is named:

1. auth: ``token_required`` → ``verify_access_token``, the ``Caller`` on ``flask.g``
2. the form: ``read_analysis_form`` → ``AnalysisForm`` (photo, digest, note, lang, save, key)
3. idempotency guard: locks.py's ``IdempotencyRecords.guard`` (a replay, or the key held)
4. cache: ``cached_or_fresh`` → ``cache_key_for``, ``AnalysisCache`` over store.py's ``Store``
5. single flight: locks.py's ``SingleFlight.run`` (one model call among concurrent misses)
6. image: ``fresh_analysis`` → ``prepare_image`` (within decode_budget.py's ``DecodeBudget``)
7. model slot: ``ModelSlots.hold``
8. model: ``VisionModel.analyze`` → ``VisionModel.attempt`` → outbound_http.py's ``http_json``,
   sending the fields model_servers.py's ``RequestFields`` picks; the answer through prompt.py's
   ``parse_model_payload`` → meal.py's ``normalise_analysis`` (model_servers.py's
   ``ModelEndpoint.read_reply`` reads other servers' errors and waits); the verdict cached
9. save: ``UserService.save`` with meal.py's ``food_entry``
10. answer: locks.py's ``IdempotencyGuard.answer``

Errors are errors.py's ``ServiceError`` values carrying an HTTP status and a stable ``ErrorCode``:
``BadRequest``, ``Unauthorized``, ``IdempotencyKeyInProgress``, ``IdempotencyKeyReused``,
``NotFood``, ``UpstreamError``, ``UpstreamTimeout``, ``UpstreamRateLimited``, ``UserServiceError``,
``AINotConfigured``, ``Overloaded`` (``RetryLater``, as ``UpstreamRateLimited`` and
``RecordsUnavailable`` are) and ``InternalError``; one handler turns them into JSON, and another
turns Werkzeug's HTTP errors (404, 405, 413) into the same shape.
Importing the module builds nothing: ``create_app`` builds an app, and ``app.app`` (what
``gunicorn app:app`` serves) is built from the environment on first use.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any, TypeVar, cast
from urllib.parse import quote

import jwt
import pillow_heif
import prometheus_client
import requests
import tenacity
import yaml
from flask import Blueprint, Flask, Response, current_app, g, has_request_context, jsonify, request
from flask.wrappers import Request
from flask_cors import CORS
from gunicorn.http.errors import (
    ChunkMissingTerminator,
    InvalidChunkExtension,
    InvalidChunkSize,
    InvalidHeader,
    InvalidHeaderName,
    LimitRequestHeaders,
    ObsoleteFolding,
    ParseException,
)
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

from barcodes import lookup_form, read_barcodes
from decode_budget import DecodeBudget, decode_cost
from errors import (
    AINotConfigured,
    BadRequest,
    ConfigError,
    ErrorCode,
    InternalError,
    NotFood,
    NutritionNotConfigured,
    Overloaded,
    ProductLookupError,
    ProductNotFound,
    ServiceError,
    TransientUpstreamError,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UserServiceError,
)
from json_values import parse_json
from locks import IdempotencyRecords, SingleFlight
from logs import RequestContextFilter
from meal import (
    MAX_ITEMS,
    MAX_NAME_LENGTH,
    NOT_FOOD,
    Analysis,
    NotFoodVerdict,
    as_cached,
    as_contract,
    final_analysis,
    food_entry,
    from_cached,
    in_upload_order,
    nutrition_analysis,
    products_analysis,
    stored_analysis_is_sound,
)
from metrics import (
    CACHE_EVENTS,
    MODEL_REQUESTS,
    MODEL_SECONDS,
    MODEL_SHUTDOWN_DAYS,
    MODEL_TOKENS,
    REQUEST_SECONDS,
    REQUESTS,
    SINGLE_FLIGHT,
    USER_SERVICE_REQUESTS,
    metrics_text,
)
from model_servers import (
    LearntProfile,
    ModelEndpoint,
    RequestFields,
    ServerProfile,
    ShutdownWatch,
    connection_failure,
    finish_reason,
    listed_model_names,
    log_model_failure,
    probe_verdict,
    shutdown_in,
    token_usage,
)
from nutrition import BUNDLED_SR28, NutritionDataError, NutritionTable
from outbound_http import (
    UpstreamReply,
    build_session,
    http_json,
    never_sent,
    public_url,
    user_service_problem,
)
from products import Product, ProductLookup
from prompt import (
    ANALYSIS_SCHEMA,
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    ModelAnswer,
    language_instruction,
    parse_model_payload,
    products_block,
    user_note_block,
    user_prompt,
)
from settings import (
    EnvReader,
    Setting,
    boolean_flag,
    comma_list,
    decimal,
    flag_value,
    header_name,
    http_url,
    http_url_or_off,
    json_object,
    jwt_algorithm_names,
    jwt_problems,
    one_of,
    pem_key,
    plain_text,
    read_secret_file,
    redis_address,
    redis_problems,
    redis_url_password,
    setting,
    whole_number,
)
from store import (
    RedisSettings,
    RequestScope,
    Store,
    StoreUnavailable,
    build_stores,
    decode_cached,
)
from token_keys import PUBLIC_KEY_ALGORITHMS, load_public_key

SERVICE_NAME = "image-service"
MIB = 1024 * 1024
logger = logging.getLogger("image_service")

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


SECRET_FILES = {
    "redis_password": "REDIS_PASSWORD",
    "openai_api_key": "OPENAI_API_KEY",
    "jwt_secret": "JWT_SECRET",
    "jwt_public_key": "JWT_PUBLIC_KEY",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# The service's version, as pyproject.toml gives it; Open Food Facts' User-Agent names it.
SERVICE_VERSION = "1.0.0"
# Open Food Facts asks every client to name itself, its version and a contact; an operator sets
# OPENFOODFACTS_USER_AGENT to add theirs (the start-up line warns while none is given).
OPENFOODFACTS_USER_AGENT = f"FoodTracker-ImageService/{SERVICE_VERSION}"
MAX_REASONING_OUTPUT_TOKENS = 128_000
# Pillow refuses to open anything larger as a decompression bomb, whatever the service allows.
PILLOW_MAX_PIXELS = 2 * 89_478_485
STORE_PATH_SHOWN = (
    "`$XDG_STATE_HOME/image-service/store.sqlite3`, else `~/.local/state/image-service/"
    "store.sqlite3`; the image sets `/var/lib/image-service/store.sqlite3`"
)


@dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment, checked whenever one is made.

    Each field declares its variable, default and bounds once (``setting``); ``from_env`` reads
    them and ``__post_init__`` checks every value, so ``dataclasses.replace`` cannot make a
    Config that ``from_env`` would refuse. Every problem is reported in one ``ConfigError``.
    """

    secrets_dir: str = setting("SECRETS_DIR", "/run/secrets", plain_text)
    redis_url: str | None = setting("REDIS_URL", None, redis_address, secret=True)
    redis_host: str | None = setting("REDIS_HOST", None, plain_text)
    redis_port: int = setting("REDIS_PORT", 6379, whole_number(low=1, high=65535))
    redis_db: int = setting("REDIS_DB", 0, whole_number(low=0, high=1_000_000))
    redis_password: str | None = setting("REDIS_PASSWORD", None, plain_text, secret=True)
    redis_sentinel_password: str | None = setting(
        "REDIS_SENTINEL_PASSWORD", None, plain_text, secret=True
    )
    redis_cluster: bool = setting("REDIS_CLUSTER", False, boolean_flag)
    redis_ca_cert: str | None = setting("REDIS_CA_CERT", None, plain_text)
    redis_timeout: float = setting("REDIS_TIMEOUT", 0.5, decimal(low=0.01, high=60))
    redis_breaker_failures: int = setting(
        "REDIS_BREAKER_FAILURES", 3, whole_number(low=1, high=1000)
    )
    redis_breaker_cooldown: float = setting(
        "REDIS_BREAKER_COOLDOWN", 15.0, decimal(low=0, high=3600)
    )
    openai_api_key: str | None = setting("OPENAI_API_KEY", None, plain_text, secret=True)
    openai_base_url: str = setting("OPENAI_BASE_URL", "https://api.openai.com/v1", http_url)
    openai_model: str = setting("OPENAI_MODEL", "gpt-6-luna", plain_text)
    openai_api: str = setting("OPENAI_API", "chat", one_of(("chat", "responses")))
    openai_api_timeout: float = setting("OPENAI_API_TIMEOUT", 30.0, decimal(low=0.1, high=600))
    openai_max_attempts: int = setting("OPENAI_MAX_ATTEMPTS", 3, whole_number(low=1, high=10))
    openai_image_detail: str = setting(
        "OPENAI_IMAGE_DETAIL", "auto", one_of(("low", "high", "auto"))
    )
    openai_max_output_tokens: int = setting(
        "OPENAI_MAX_OUTPUT_TOKENS", 1500, whole_number(low=100, high=16_384)
    )
    openai_reasoning_max_output_tokens: int = setting(
        "OPENAI_REASONING_MAX_OUTPUT_TOKENS",
        16_000,
        whole_number(low=1000, high=MAX_REASONING_OUTPUT_TOKENS),
    )
    openai_reasoning_effort: str = setting(
        "OPENAI_REASONING_EFFORT", "none", one_of(REASONING_EFFORTS)
    )
    openai_strict_schema: bool = setting("OPENAI_STRICT_SCHEMA", True, boolean_flag)
    # setting() gives a dict default its own default_factory.
    openai_extra_body: dict[str, Any] = setting(  # noqa: RUF009
        "OPENAI_EXTRA_BODY", {}, json_object, shown="unset"
    )
    openai_api_version: str | None = setting("OPENAI_API_VERSION", None, plain_text)
    openai_api_key_header: str = setting("OPENAI_API_KEY_HEADER", "Authorization", header_name)
    openai_probe_seconds: float = setting("OPENAI_PROBE_SECONDS", 300.0, decimal(low=0, high=86400))
    openai_shutdown_warn_days: int = setting(
        "OPENAI_SHUTDOWN_WARN_DAYS", 60, whole_number(low=0, high=366)
    )
    openai_retry_initial_wait: float = setting(
        "OPENAI_RETRY_INITIAL_WAIT", 0.5, decimal(low=0, high=60)
    )
    openai_retry_max_wait: float = setting("OPENAI_RETRY_MAX_WAIT", 8.0, decimal(low=0, high=300))
    openai_retry_after_cap: float = setting(
        "OPENAI_RETRY_AFTER_CAP", 20.0, decimal(low=0, high=300)
    )
    image_max_side: int = setting("IMAGE_MAX_SIDE", 1024, whole_number(low=64, high=8192))
    image_max_pixels: int = setting(
        "IMAGE_MAX_PIXELS", 60_000_000, whole_number(low=1_000_000, high=PILLOW_MAX_PIXELS)
    )
    decode_budget_mb: int = setting("DECODE_BUDGET_MB", 768, whole_number(low=16, high=65536))
    single_flight_lock_seconds: float = setting(
        "SINGLE_FLIGHT_LOCK_SECONDS", 10.0, decimal(low=0.1, high=600)
    )
    nutrition_source: str = setting("NUTRITION_SOURCE", "usda-sr28", one_of(("usda-sr28", "model")))
    usda_sr28_dir: str | None = setting(
        "USDA_SR28_DIR", None, plain_text, shown="the bundled copy, `usda-sr28/`"
    )
    cache_ttl_seconds: int = setting(
        "CACHE_TTL_SECONDS", 3600, whole_number(low=1, high=365 * 86400)
    )
    store_path: str | None = setting("STORE_PATH", None, plain_text, shown=STORE_PATH_SHOWN)
    store_max_mb: float = setting("STORE_MAX_MB", 256.0, decimal(low=0.01, high=1_000_000))
    user_service_url: str = setting("USER_SERVICE_URL", "http://localhost:8082", http_url)
    user_service_timeout: float = setting("USER_SERVICE_TIMEOUT", 10.0, decimal(low=0.1, high=600))
    openfoodfacts_url: str = setting(
        "OPENFOODFACTS_URL", "https://world.openfoodfacts.org", http_url_or_off, blank=""
    )
    openfoodfacts_user_agent: str = setting(
        "OPENFOODFACTS_USER_AGENT", OPENFOODFACTS_USER_AGENT, plain_text
    )
    openfoodfacts_timeout: float = setting("OPENFOODFACTS_TIMEOUT", 4.0, decimal(low=0.1, high=60))
    openfoodfacts_rate: int = setting("OPENFOODFACTS_RATE", 90, whole_number(low=1, high=100))
    openfoodfacts_found_seconds: int = setting(
        "OPENFOODFACTS_FOUND_SECONDS", 7 * 86400, whole_number(low=60, high=90 * 86400)
    )
    openfoodfacts_missing_seconds: int = setting(
        "OPENFOODFACTS_MISSING_SECONDS", 6 * 3600, whole_number(low=60, high=30 * 86400)
    )
    jwt_secret: str | None = setting("JWT_SECRET", None, plain_text, secret=True)
    jwt_public_key: str | None = setting("JWT_PUBLIC_KEY", None, pem_key)
    jwt_algorithms: tuple[str, ...] = setting("JWT_ALGORITHMS", ("HS256",), jwt_algorithm_names)
    jwt_audience: str | None = setting("JWT_AUDIENCE", None, plain_text)
    jwt_issuer: str | None = setting("JWT_ISSUER", None, plain_text)
    max_upload_mb: float = setting("MAX_UPLOAD_MB", 25.0, decimal(low=0.01, high=1024))
    max_images: int = setting("MAX_IMAGES", 5, whole_number(low=1, high=10))
    model_max_concurrency: int = setting(
        "MODEL_MAX_CONCURRENCY",
        64,
        whole_number(low=1, high=10_000),
        fallback="GUNICORN_THREADS",
        shown="`GUNICORN_THREADS` (64)",
    )
    model_queue_timeout: float = setting("MODEL_QUEUE_TIMEOUT", 2.0, decimal(low=0, high=600))
    startup_grace_seconds: float = setting(
        "STARTUP_GRACE_SECONDS", 30.0, decimal(low=0, high=86400)
    )
    cors_origins: tuple[str, ...] = setting("CORS_ORIGINS", ("*",), comma_list)
    log_level: str = setting("LOG_LEVEL", "INFO", one_of(LOG_LEVELS, case=str.upper))

    def __post_init__(self) -> None:
        """Refuse a Config holding a value its setting does not allow, naming every one."""
        problems = [
            problem
            for item in dataclasses.fields(self)
            if (problem := item.metadata["setting"].problem(getattr(self, item.name)))
        ]
        problems.extend(jwt_problems(self.jwt_algorithms, self.jwt_public_key))
        problems.extend(redis_problems(self.redis_url, self.redis_cluster, self.redis_db))
        if self.nutrition_source == "model" and self.usda_sr28_dir is not None:
            problems.append(
                "USDA_SR28_DIR names a table, but NUTRITION_SOURCE=model turns counting off: "
                "unset one of them"
            )
        if problems:
            raise ConfigError(problems)

    @classmethod
    def settings(cls) -> dict[str, Setting[Any]]:
        """Every declared setting by field name."""
        return {item.name: item.metadata["setting"] for item in dataclasses.fields(cls)}

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        secrets_dir: str | os.PathLike[str] | None = None,
    ) -> Config:
        """Build a Config from environment variables and secret files, naming every bad value."""
        env = dict(os.environ if environ is None else environ)
        directory = Path(secrets_dir or env.get("SECRETS_DIR") or "/run/secrets")
        problems: list[str] = []
        for filename, variable in SECRET_FILES.items():
            value = read_secret_file(directory / filename, problems)
            if value is not None:
                env[variable] = value
        env["SECRETS_DIR"] = str(directory)
        reader = EnvReader(env, problems)
        values = {
            item.name: reader.read(item.metadata["setting"], cls.default_of(item))
            for item in dataclasses.fields(cls)
        }
        values["store_path"] = values["store_path"] or default_store_path(env)
        try:
            config = cls(**values)
        except ConfigError as error:
            problems.extend(error.problems)
        if problems:
            raise ConfigError(problems)
        return config

    @staticmethod
    def default_of(item: dataclasses.Field[Any]) -> Any:
        """A field's default value."""
        if item.default_factory is not dataclasses.MISSING:
            return item.default_factory()
        return item.default

    @property
    def max_upload_bytes(self) -> int:
        """``MAX_UPLOAD_MB`` in bytes."""
        return int(self.max_upload_mb * MIB)

    @property
    def store_file(self) -> Path:
        """``STORE_PATH``; a Config built without ``from_env`` takes this process's default."""
        return Path(self.store_path or default_store_path(os.environ))

    @property
    def redis_configured(self) -> bool:
        """Whether a Redis server is configured at all."""
        return bool(self.redis_url or self.redis_host)

    @property
    def openai_configured(self) -> bool:
        """Whether the vision model can be called."""
        return bool(self.openai_api_key)

    @property
    def uses_public_key(self) -> bool:
        """Whether tokens are verified with an asymmetric public key rather than a secret."""
        return self.jwt_algorithms[0] in PUBLIC_KEY_ALGORITHMS

    @property
    def jwt_configured(self) -> bool:
        """Whether tokens can be verified at all."""
        return bool(self.jwt_public_key if self.uses_public_key else self.jwt_secret)

    @property
    def model_budget_seconds(self) -> float:
        """The longest one analysis may spend on the model: every attempt and the waits between."""
        waits = (self.openai_max_attempts - 1) * max(
            self.openai_retry_max_wait, self.openai_retry_after_cap
        )
        return self.openai_max_attempts * self.openai_api_timeout + waits

    @property
    def worst_request_seconds(self) -> float:
        """The longest a request may legitimately take: the model's budget, a slot, a save."""
        return self.model_budget_seconds + self.model_queue_timeout + self.user_service_timeout


def default_store_path(env: Mapping[str, str]) -> str:
    """The per-user default of ``STORE_PATH``, in the XDG state folder; never a shared /tmp."""
    state = env.get("XDG_STATE_HOME", "").strip()
    if not os.path.isabs(state):  # the XDG spec says to ignore a relative one
        home = env.get("HOME", "").strip() or os.path.expanduser("~")
        state = os.path.join(home, ".local", "state")
    return os.path.join(state, SERVICE_NAME, "store.sqlite3")


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


# A request id, the caller's or an upstream's, that is safe to log and echo.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def request_id_or_dash() -> str:
    """The current request's id, or '-' outside a request."""
    try:
        return cast(str, g.get("request_id", "-"))
    except RuntimeError:
        return "-"


LOG_FILTER = RequestContextFilter(request_id_or_dash)


def configure_logging(config: Config) -> None:
    """Send the service's lines to stdout, once per process; redact every app's secrets."""
    logger.setLevel(config.log_level)
    LOG_FILTER.redact_also(
        config.openai_api_key,
        config.jwt_secret,
        config.redis_password,
        config.redis_sentinel_password,
        redis_url_password(config.redis_url),
    )
    if LOG_FILTER in logger.filters:
        return
    logger.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(message)s")
    )
    logger.addHandler(handler)
    logger.addFilter(LOG_FILTER)


# ---------------------------------------------------------------------------------------------
# Authentication (JWT)
# ---------------------------------------------------------------------------------------------


MIN_HS_SECRET_BYTES = 32
# exp, nbf and iat are NumericDate values (RFC 7519): numbers, which PyJWT also takes as numeric
# text; a number past the year 9999 would never expire.
TIME_CLAIMS = ("exp", "nbf", "iat")
MAX_TIMESTAMP = 253_402_300_799
MAX_TOKEN_LENGTH = 8192


ViewFunc = TypeVar("ViewFunc", bound=Callable[..., Any])


@dataclass(frozen=True)
class Caller:
    """Who is asking: the token's user id and the Authorization header to forward."""

    user_id: str
    authorization: str


@dataclass(frozen=True)
class AccessTokens:
    """What verifying a token needs, kept in ``app.extensions`` beside the app's collaborators."""

    config: Config
    key: Any


# The ``app.extensions`` key create_app keeps the app's ``AccessTokens`` under.
ACCESS_TOKENS = "image-service.access-tokens"


def token_required(view: ViewFunc) -> ViewFunc:
    """Let the view run only for a valid access token; put the ``Caller`` on ``g.caller``."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tokens = cast(AccessTokens, current_app.extensions[ACCESS_TOKENS])
        header = request.headers.get("Authorization")
        token = bearer_token(header)
        user_id = verify_access_token(token, tokens.config, tokens.key)
        g.caller = Caller(user_id=user_id, authorization=cast(str, header))
        return view(*args, **kwargs)

    return cast(ViewFunc, wrapper)


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header."""
    if not header or not header.strip():
        raise Unauthorized(
            "send an Authorization: Bearer <token> header", code=ErrorCode.MISSING_TOKEN
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("the Authorization header must use the Bearer scheme")
    token = token.strip()
    if not token:
        raise Unauthorized("the Bearer token is empty", code=ErrorCode.MISSING_TOKEN)
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthorized(f"the token is longer than {MAX_TOKEN_LENGTH} characters")
    return token


def jwt_verification_key(config: Config) -> Any:
    """The key tokens are verified with: the public key object, the shared secret, or None."""
    if config.uses_public_key:
        return load_public_key(config.jwt_public_key) if config.jwt_public_key else None
    return config.jwt_secret


def verify_access_token(token: str, config: Config, key: Any) -> str:
    """Verify signature, expiry, audience, issuer and type; return the user id."""
    if key is None:
        raise Unauthorized("token verification is not configured on this server")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=list(config.jwt_algorithms),
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            options={"require": ["exp"], "verify_aud": config.jwt_audience is not None},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized(
            "the token has expired; sign in again for a fresh one (in development: make token)",
            code=ErrorCode.TOKEN_EXPIRED,
        ) from None
    except (jwt.InvalidTokenError, jwt.InvalidKeyError) as error:
        raise Unauthorized(f"the token is not valid: {token_problem(error)}") from None
    for name in TIME_CLAIMS:
        if name in claims and not is_timestamp(claims[name]):
            raise Unauthorized(f"the token's {name} claim is not a time in seconds")
    if any(claims.get(name, "access") != "access" for name in ("type", "token_type")):
        raise Unauthorized("the token is not an access token")
    user_id = claims.get("sub", claims.get("user_id"))
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int)) or str(user_id) == "":
        raise Unauthorized("the token names no user (sub or user_id)")
    return str(user_id)


def is_timestamp(value: Any) -> bool:
    """A JSON number of seconds since 1970, before the year 10000 (not text, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value <= MAX_TIMESTAMP  # NaN and infinities compare false or beyond


def token_problem(error: jwt.PyJWTError) -> str:
    """A short, safe reason for a rejected token."""
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"the {error.claim} claim is required"
    if isinstance(error, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(error, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(error, jwt.ImmatureSignatureError):
        return "not valid yet"
    if isinstance(error, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(error, jwt.InvalidSignatureError):
        return "bad signature"
    return "malformed"


# ---------------------------------------------------------------------------------------------
# The form
# ---------------------------------------------------------------------------------------------


IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")
LANGUAGE_TAG_PATTERN = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8}){0,4}")
# Form limits beside MAX_UPLOAD_MB: a photo, a short note, nothing else is expected.
MAX_FORM_PARTS = 16
MAX_FORM_FIELD_BYTES = 256 * 1024
MAX_USER_NOTE = 500
MAX_FILENAME_SHOWN = 100


class UploadRequest(Request):
    """Keeps uploads in memory: bodies are already bounded by ``MAX_UPLOAD_MB``."""

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        return io.BytesIO()


@dataclass(frozen=True)
class AnalysisRequest:
    """What the caller asks about a photo beyond the photo itself."""

    note: str | None = None
    lang: str = "en"

    def cache_inputs(self) -> tuple[str, ...]:
        """The parts of the cache key these change."""
        return (f"lang={self.lang.lower()}", f"note={self.note or ''}")


@dataclass(frozen=True)
class Photo:
    """One distinct photo of a request: its bytes, digest, and where the caller put it."""

    data: bytes
    digest: str
    positions: tuple[int, ...]  # 1-based, in the caller's upload order; a photo sent twice has two
    filename: str | None = None

    @property
    def named(self) -> str:
        """The photo as an error message names it: ``photo 2 (plate.jpg)``."""
        return photo_name(self.positions[0], self.filename)


def photo_name(position: int, filename: str | None) -> str:
    """``photo 2 (plate.jpg)``: the position in the upload, and the filename when there is one."""
    where = f"photo {position}"
    shown = " ".join((filename or "").split())[:MAX_FILENAME_SHOWN]
    return f"{where} ({shown})" if shown else where


@dataclass(frozen=True)
class AnalysisForm:
    """What one ``POST /analyze-food`` carries, read and checked.

    ``photos`` are the distinct photos in a fixed order (by digest) that does not depend on the
    order of the upload: the model sees them, and the cache keeps their answer, in that order.
    """

    photos: tuple[Photo, ...]
    wanted: AnalysisRequest
    save: bool = False
    idempotency_key: str | None = None

    @property
    def digest(self) -> str:
        """The set's digest: the photo's own for one, else one over the photos' in fixed order."""
        return set_digest([photo.digest for photo in self.photos])

    @property
    def digests(self) -> list[str]:
        """Each distinct photo's digest, in the caller's upload order."""
        return [photo.digest for photo in sorted(self.photos, key=lambda one: one.positions[0])]

    @property
    def fingerprint(self) -> str:
        """What an Idempotency-Key's retries must repeat: the photos and every other input."""
        parts = (self.digest, *self.wanted.cache_inputs())
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def image_digest(data: bytes) -> str:
    """The hex digest that identifies an upload."""
    return hashlib.sha256(data).hexdigest()


def set_digest(digests: Sequence[str]) -> str:
    """The digest of a set of photos, whatever their order; one photo keeps its own."""
    distinct = sorted(set(digests))
    if len(distinct) == 1:
        return distinct[0]
    return hashlib.sha256(("photos\n" + "\n".join(distinct)).encode()).hexdigest()


def distinct_photos(uploads: Sequence[tuple[bytes, str | None]]) -> tuple[Photo, ...]:
    """The uploads as distinct photos in fixed order: a photo sent twice counts once."""
    found: dict[str, Photo] = {}
    for position, (data, filename) in enumerate(uploads, start=1):
        digest = image_digest(data)
        seen = found.get(digest)
        if seen is None:
            found[digest] = Photo(data, digest, (position,), filename)
        else:
            found[digest] = dataclasses.replace(seen, positions=(*seen.positions, position))
    return tuple(found[digest] for digest in sorted(found))


def read_analysis_form(max_images: int) -> AnalysisForm:
    """The query, headers and form of an analysis request, each checked (400 when wrong)."""
    save = query_flag(request.args.get("save"), "save")
    idempotency_key = read_idempotency_key() if save else None
    lang = read_language()
    photos = distinct_photos(read_uploads(max_images))
    wanted = AnalysisRequest(note=read_note(), lang=lang)
    return AnalysisForm(photos, wanted, save, idempotency_key)


def query_flag(value: str | None, name: str) -> bool:
    """A boolean query parameter in a flag's words (``flag_value``); absent is false."""
    if value is None:
        return False
    word = flag_value(value)
    if word is None:
        raise BadRequest(f"{name} must be true or false, got {value[:20]!r}")
    return word


def read_idempotency_key() -> str | None:
    """The ``Idempotency-Key`` header, if sent: 1 to 255 visible ASCII characters."""
    value = request.headers.get("Idempotency-Key")
    if value is None:
        return None
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(value):
        raise BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return value


def read_language() -> str:
    """The answer's language: ``lang`` (BCP 47), else ``Accept-Language``, else English."""
    value = request.args.get("lang")
    if value is not None:
        if not LANGUAGE_TAG_PATTERN.fullmatch(value):
            raise BadRequest(
                f"lang must be a BCP 47 language tag such as en or pt-BR, got {value[:40]!r}"
            )
        return value
    for tag, _quality in request.accept_languages:
        if LANGUAGE_TAG_PATTERN.fullmatch(tag):
            return tag
    return "en"


def read_uploads(max_images: int) -> list[tuple[bytes, str | None]]:
    """The bytes and filename of each ``image`` file part, 1 to ``max_images`` of them."""
    if request.mimetype != "multipart/form-data":
        raise BadRequest(
            "send the photo as multipart/form-data with a file part named image",
            code=ErrorCode.MISSING_IMAGE,
        )
    uploads = request.files.getlist("image")
    if not uploads and "image" in request.form:
        raise BadRequest(
            "the image part arrived as a text field: send it as a file part with a filename "
            "(curl -F image=@meal.jpg); a filename must be UTF-8 without line breaks",
            code=ErrorCode.MISSING_IMAGE,
        )
    if not uploads and not request.files and not request.form:
        raise BadRequest(
            "the form has no readable part: send the photo as a file part named image; field "
            "names and filenames must be UTF-8 without line breaks",
            code=ErrorCode.MISSING_IMAGE,
        )
    if not uploads:
        raise BadRequest("the form has no file part named image", code=ErrorCode.MISSING_IMAGE)
    if len(uploads) > max_images:
        raise BadRequest(
            f"send at most {max_images} photos (file parts named image) of one meal, "
            f"not {len(uploads)}",
            code=ErrorCode.TOO_MANY_IMAGES,
        )
    read = [(upload.stream.read(), upload.filename or None) for upload in uploads]
    for position, (data, filename) in enumerate(read, start=1):
        if not data:
            which = "the image part" if len(read) == 1 else photo_name(position, filename)
            raise BadRequest(f"{which} is empty", code=ErrorCode.EMPTY_IMAGE)
    return read


def read_note() -> str | None:
    """The optional ``note`` form field: the user's own context, at most 500 characters."""
    notes = request.form.getlist("note")
    if len(notes) > 1:
        raise BadRequest("send at most one note field")
    note = " ".join(notes[0].split()) if notes else ""
    if len(note) > MAX_USER_NOTE:
        raise BadRequest(f"note must be at most {MAX_USER_NOTE} characters, got {len(note)}")
    return note or None


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


CACHE_PREFIX = "food_analysis:"


def cache_key_for(digest: str, config: Config, *inputs: str) -> str:
    """The key of an analysis: the image and everything else that changes the model's answer."""
    parts = (
        digest,
        config.openai_model,
        PROMPT_VERSION,
        config.openai_image_detail,
        str(config.image_max_side),
        *inputs,
    )
    return CACHE_PREFIX + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def private_inputs(wanted: AnalysisRequest, user_id: str) -> tuple[str, ...]:
    """The caller, when a note is sent: a note is private, so its answer is the caller's alone."""
    return (f"user={user_id}",) if wanted.note else ()


class AnalysisCache:
    """Analyses by cache key; a store failure is a miss, never an error for the caller."""

    def __init__(self, store: Store, ttl_seconds: int) -> None:
        self.store = store
        self.ttl_seconds = ttl_seconds

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached analysis, or None on a miss or any store problem."""
        try:
            return decode_cached(self.store.get(key))
        except StoreUnavailable:
            return None

    def set(self, key: str, value: Mapping[str, Any]) -> None:
        """Store an analysis with the configured TTL, ignoring store problems."""
        with contextlib.suppress(StoreUnavailable):
            self.store.set(key, json.dumps(value, separators=(",", ":")), self.ttl_seconds)


def redis_settings(config: Config) -> RedisSettings | None:
    """How to reach the configured Redis, or None for the embedded store."""
    if not config.redis_configured:
        return None
    url = config.redis_url or f"redis://{config.redis_host}:{config.redis_port}/{config.redis_db}"
    return RedisSettings(
        url=url,
        password=config.redis_password,
        sentinel_password=config.redis_sentinel_password,
        ca_cert=config.redis_ca_cert,
        cluster=config.redis_cluster,
        timeout=config.redis_timeout,
        breaker_failures=config.redis_breaker_failures,
        breaker_cooldown=config.redis_breaker_cooldown,
    )


def request_scope() -> RequestScope | None:
    """This request's store state, kept on ``flask.g``: Redis is not asked again after failing."""
    if not has_request_context():
        return None
    if "store_scope" not in g:
        g.store_scope = RequestScope()
    return cast(RequestScope, g.store_scope)


def count_cache_event(event: str) -> None:
    """Count a store ``error`` or a ``skipped`` call."""
    CACHE_EVENTS.labels(event).inc()


def count_single_flight(role: str) -> None:
    """Count a request leading, following or taking over a single flight."""
    SINGLE_FLIGHT.labels(role).inc()


# ---------------------------------------------------------------------------------------------
# Image preparation (Pillow)
# ---------------------------------------------------------------------------------------------


# Formats Pillow may open (HEIF through pillow-heif: iPhones take HEIC photos).
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "HEIF")
# What Pillow and pillow-heif raise for data they cannot decode (libheif reports through
# RuntimeError, a short read through EOFError).
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    RuntimeError,
    Image.DecompressionBombError,
)
JPEG_QUALITY = 85
DRAFT_SLACK = 0.9


@dataclass(frozen=True)
class PreparedImage:
    """The JPEG sent to the model, with what it came from."""

    jpeg: bytes
    width: int
    height: int
    source_format: str
    barcodes: tuple[str, ...] = ()  # product codes read from the photo, as they are looked up


def prepare_image(
    data: bytes, max_side: int, max_pixels: int, budget: DecodeBudget, *, scan: bool = False
) -> PreparedImage:
    """Decode an upload within the decode budget, orient, shrink, flatten to RGB, re-encode bare.

    The image is opened lazily, told to decode no larger than it needs, and its cost reserved
    from ``budget`` before a byte is decoded.
    """
    image = open_image(data, max_pixels)
    reduce_while_decoding(image, max_side)
    with budget.reserve(decode_cost(image)):
        return prepare_opened(image, max_side, scan=scan)


def prepare_opened(image: Image.Image, max_side: int, *, scan: bool = False) -> PreparedImage:
    """Decode an opened upload and make the model's JPEG of it.

    The image is shrunk before its transparency is flattened, so that the full-size pixels are
    held once or twice (as decoded, then as RGB or RGBA), never in the several copies a
    full-size flatten would take.
    """
    source_format = image.format or "unknown"
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        # Read from the reduced decode, before the shrink: a code a quarter of a 12 MP photo
        # wide keeps about 250 pixels here, without a second decode.
        codes = read_barcodes(image) if scan else ()
        image = shrink(to_resizable(to_srgb(image)), max_side)
        image = flatten_to_rgb(image)
        output = io.BytesIO()
        image.save(output, format="JPEG", quality=JPEG_QUALITY, exif=b"", icc_profile=None)
    except DECODE_ERRORS as error:
        raise BadRequest(
            f"the image could not be decoded ({source_format})", code=ErrorCode.INVALID_IMAGE
        ) from error
    return PreparedImage(
        jpeg=output.getvalue(),
        width=image.width,
        height=image.height,
        source_format=source_format,
        barcodes=codes,
    )


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open an upload lazily with the accepted formats only, refusing oversized headers."""
    enable_heif()
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        other = identify_format(data)
        if other:
            raise BadRequest(
                f"{other} images are not supported; send JPEG, PNG, WebP, GIF or HEIC",
                code=ErrorCode.UNSUPPORTED_IMAGE_TYPE,
            ) from None
        raise BadRequest(
            "the upload is not a decodable image (JPEG, PNG, WebP, GIF or HEIC)",
            code=ErrorCode.INVALID_IMAGE,
        ) from None
    except DECODE_ERRORS:
        raise BadRequest(
            "the upload is not a decodable image, or its dimensions are too large",
            code=ErrorCode.INVALID_IMAGE,
        ) from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise BadRequest(
            f"the image is {width}x{height} pixels; at most {max_pixels} pixels are accepted",
            code=ErrorCode.INVALID_IMAGE,
        )
    return image


@functools.cache
def enable_heif() -> None:
    """Teach Pillow HEIC and HEIF (iPhone photos), once per process, on the first upload."""
    pillow_heif.register_heif_opener()


def identify_format(data: bytes) -> str | None:
    """Name the format of a real image the service does not take, from its header only."""
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in {b"avif", b"avis"}:
        return "AVIF"
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except DECODE_ERRORS:
        return None


def reduce_while_decoding(image: Image.Image, max_side: int) -> None:
    """Let a JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) that nearly covers ``max_side``.

    A scale landing within ``DRAFT_SLACK`` of the target is taken as it is (a 4032-pixel photo
    decodes at 1/4 to 1008 pixels for a 1024 target), which saves both the larger decode and the
    resize after it.
    """
    if image.format != "JPEG" or max(image.size) <= max_side:
        return
    scale = max_side * DRAFT_SLACK / max(image.size)
    wanted = (max(1, math.ceil(image.width * scale)), max(1, math.ceil(image.height * scale)))
    image.draft(None, wanted)


def to_resizable(image: Image.Image) -> Image.Image:
    """L, RGB, LA or RGBA, the modes Pillow resizes well: 16-bit scaled to 8, palettes and CMYK
    converted, a transparent colour turned into alpha."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.convert("I").point(lambda value: value / 256, "L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode in ("L", "RGB", "LA", "RGBA") and "transparency" not in image.info:
        return image
    alpha = "transparency" in image.info or image.mode in ("PA", "RGBa", "La")
    return image.convert("RGBA" if alpha else "RGB")


def flatten_to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency laid on white."""
    if image.mode == "RGB":
        return image
    if image.mode not in ("LA", "RGBA"):
        return image.convert("RGB")
    rgba = image.convert("RGBA") if image.mode == "LA" else image
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """Resize so the long side is at most ``max_side``; never enlarge."""
    longest = max(image.size)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def to_srgb(image: Image.Image) -> Image.Image:
    """Convert colours from an embedded RGB or CMYK profile (Display P3, Adobe RGB) to sRGB."""
    icc_profile = image.info.get("icc_profile")
    if not icc_profile or image.mode not in ("RGB", "CMYK"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        converted = ImageCms.profileToProfile(image, source, SRGB_PROFILE, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image
    return converted if converted is not None else image


SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))

# ---------------------------------------------------------------------------------------------
# Model slots
# ---------------------------------------------------------------------------------------------


class ModelSlots:
    """At most ``MODEL_MAX_CONCURRENCY`` model calls at once in a process; the rest wait briefly."""

    def __init__(self, size: int, wait_seconds: float) -> None:
        self.slots = threading.BoundedSemaphore(size)
        self.wait_seconds = wait_seconds

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a slot, or answer 503 ``overloaded`` when none frees up in time."""
        if not self.slots.acquire(timeout=self.wait_seconds):
            raise Overloaded(
                "too many photos are being analyzed right now; retry shortly",
                retry_after=self.wait_seconds,
            )
        try:
            yield
        finally:
            self.slots.release()


# ---------------------------------------------------------------------------------------------
# Vision model (OpenAI Chat Completions)
# ---------------------------------------------------------------------------------------------


PROBE_TIMEOUT_SECONDS = 5.0


def build_model_request(
    jpegs: Sequence[bytes],
    config: Config,
    wanted: AnalysisRequest,
    products: Sequence[Product] = (),
) -> dict[str, Any]:
    """The Chat Completions body for a meal's photos, each its own image part, in the order given;
    the user's note travels only as quoted data."""
    content: list[dict[str, Any]] = [
        {"type": "text", "text": f"{user_prompt(len(jpegs))} {language_instruction(wanted.lang)}"},
    ]
    if wanted.note:
        content.append({"type": "text", "text": user_note_block(wanted.note)})
    if products:
        content.append({"type": "text", "text": products_block(products)})
    for number, jpeg in enumerate(jpegs, start=1):
        if len(jpegs) > 1:
            content.append({"type": "text", "text": f"Photo {number}:"})
        data_url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        content.append(
            {
                "type": "image_url",
                "image_url": {"url": data_url, "detail": config.openai_image_detail},
            }
        )
    return {
        "model": config.openai_model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": content},
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "food_analysis",
                "strict": config.openai_strict_schema,
                "schema": ANALYSIS_SCHEMA,
            },
        },
    }


class StopAtDeadline(tenacity.stop.stop_base):
    """Stop retrying when the next attempt could not start before the call's deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return time.monotonic() + (retry_state.upcoming_sleep or 0.0) >= self.deadline


class RetryAfterWait(tenacity.wait.wait_base):
    """Wait what the server asked for (up to a cap), else jittered exponential backoff."""

    def __init__(self, config: Config) -> None:
        self.cap = config.openai_retry_after_cap
        self.backoff = tenacity.wait_exponential_jitter(
            multiplier=config.openai_retry_initial_wait,
            max=config.openai_retry_max_wait,
            jitter=config.openai_retry_initial_wait,
        )

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        """Seconds to sleep before the next attempt."""
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, TransientUpstreamError) and error.retry_after is not None:
            return min(error.retry_after, self.cap)
        return float(self.backoff(retry_state))


def log_model_retry(retry_state: tenacity.RetryCallState) -> None:
    """Say that an attempt failed and another follows."""
    wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
    logger.info(
        "Retrying the vision model (attempt %d failed; waiting %.2fs)",
        retry_state.attempt_number,
        wait,
    )


def attempt_outcome(error: ServiceError) -> str:
    """The outcome label of a failed attempt."""
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, TransientUpstreamError):
        return "retryable_error"
    if isinstance(error, UpstreamRateLimited):
        return "rate_limited"
    return "error"


TOKEN_KINDS = {
    "prompt_tokens": "prompt",
    "completion_tokens": "completion",
    "reasoning_tokens": "reasoning",
    "cached_tokens": "cached_prompt",
}


def count_tokens(usage: Mapping[str, int]) -> None:
    """Add a completion's tokens to the metrics (reasoning and cached tokens by themselves)."""
    for name, kind in TOKEN_KINDS.items():
        MODEL_TOKENS.labels(kind).inc(usage.get(name, 0))


class VisionModel:
    """The model's server, one client per app, over Chat Completions or the Responses API.

    It owns its session, retries each request with tenacity (bounded by attempts and by the
    call's deadline), adapts the request to what the server has shown it takes
    (``model_servers.LearntProfile``: per model, base URL and effort, shared with the other
    workers through the store; ``model_servers.RequestFields`` picks the fields and the cap),
    reads each reply through ``model_servers.ModelEndpoint`` and probes the server for
    ``/health`` on its own clock, watching the model's shutdown date
    (``model_servers.ShutdownWatch``).
    """

    def __init__(
        self,
        config: Config,
        session: requests.Session,
        store: Store,
        today: Callable[[], date] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.session = session
        self.server = LearntProfile(
            store,
            config.openai_base_url,
            config.openai_model,
            config.openai_reasoning_effort,
            unavailable=StoreUnavailable,
        )
        self.fields = RequestFields(
            config.openai_model,
            config.openai_reasoning_effort,
            config.openai_max_output_tokens,
            config.openai_reasoning_max_output_tokens,
            MAX_REASONING_OUTPUT_TOKENS,
            config.openai_extra_body,
        )
        self.endpoint = ModelEndpoint(
            config.openai_base_url,
            config.openai_model,
            config.openai_api_key or "",
            config.openai_api_key_header,
            config.openai_api_version,
            config.openai_retry_after_cap,
            REQUEST_ID_PATTERN,
            config.openai_api,
        )
        self.wait = RetryAfterWait(config)
        self.clock = clock
        self.probe_lock = threading.Lock()
        self.probe_verdict = "checking" if config.openai_probe_seconds else "disabled"
        self.probe_due = 0.0 if config.openai_probe_seconds else math.inf
        self.probing = False
        self.shutdown = ShutdownWatch(
            config.openai_model,
            config.openai_shutdown_warn_days,
            self.count_shutdown_days,
            today,
        )

    # -- the analysis

    def analyze(
        self,
        jpegs: Sequence[bytes],
        wanted: AnalysisRequest,
        request_id: str,
        products: Sequence[Product] = (),
    ) -> ModelAnswer:
        """Ask about a meal's photos and normalise the answer, adapting the request to the server.

        A refused field is renamed or left out and the photo asked about again; a reasoning
        model whose answer was cut short while reasoning gets one more try with a larger cap.
        All of it stays within the time budget of ``OPENAI_MAX_ATTEMPTS`` attempts.
        """
        if not self.config.openai_configured:
            raise AINotConfigured(
                "image analysis is not configured: set OPENAI_API_KEY (or the openai_api_key "
                "secret); for a local server such as Ollama, any value, with OPENAI_BASE_URL "
                "pointing at it"
            )
        deadline = time.monotonic() + self.config.model_budget_seconds
        base = build_model_request(jpegs, self.config, wanted, products)
        profile = self.server.current()
        cap = self.fields.output_cap(profile)
        # At most two completions, the second with a larger cap for an answer cut short while
        # reasoning; the fields the server refused stay refused for it.
        refused: set[str] = set()
        grown = False
        while True:
            profile, cap, payload = self.complete(base, profile, cap, refused, request_id, deadline)
            usage = token_usage(payload)
            count_tokens(usage)
            if usage.get("reasoning_tokens") and not profile.reasoning:
                profile = self.server.learn(
                    dataclasses.replace(profile, reasoning=True), "reported reasoning tokens"
                )
            finish = finish_reason(payload)
            if finish == "content_filter":
                log_model_failure("the provider filtered the answer")
                raise UpstreamError(
                    "the model provider filtered the answer (finish_reason content_filter); "
                    "nothing usable came back for this photo"
                )
            try:
                return parse_model_payload(payload, self.config.openai_model, len(jpegs))
            except UpstreamError:
                if finish != "length":
                    raise
            bigger = self.fields.larger_cap(profile, cap, usage)
            if grown or bigger is None or deadline - time.monotonic() < self.attempt_seconds:
                raise self.fields.out_of_tokens(profile, cap, usage)
            logger.info(
                "The vision model reasoned through its %d output tokens; asking once more with %d",
                cap,
                bigger,
            )
            cap, grown = bigger, True

    def complete(
        self,
        base: Mapping[str, Any],
        profile: ServerProfile,
        cap: int,
        refused: set[str],
        request_id: str,
        deadline: float,
    ) -> tuple[ServerProfile, int, dict[str, Any]]:
        """A completion, with the profile and cap it took: a refused field is renamed or left out.

        Each request body is retried on its own (``retrying``); ``refused`` gathers the fields
        the server refused, and a field refused again, or none left to try, is the error.
        """
        while True:
            body = self.fields.body(base, profile, cap)
            try:
                payload: dict[str, Any] = self.retrying(deadline)(
                    self.attempt, body, request_id, deadline=deadline
                )
                return profile, cap, payload
            except UpstreamError as error:
                field_name = error.rejected_parameter or ""
                revised = self.fields.without_refused(profile, field_name, refused)
                if revised is None or time.monotonic() >= deadline:
                    raise
                refused.add(field_name)
                profile = self.server.learn(revised, f"refused {field_name}")
                cap = max(cap, self.fields.output_cap(profile))

    def retrying(self, deadline: float) -> tenacity.Retrying:
        """Tenacity for one request: transient failures, within the attempts and the deadline."""
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.config.openai_max_attempts)
            | StopAtDeadline(deadline),
            wait=self.wait,
            retry=tenacity.retry_if_exception_type(TransientUpstreamError),
            before_sleep=log_model_retry,
            reraise=True,
        )

    # -- one attempt

    @property
    def attempt_seconds(self) -> float:
        """The longest one attempt may take."""
        return self.config.openai_api_timeout

    def attempt(
        self, body: Mapping[str, Any], request_id: str, *, deadline: float
    ) -> dict[str, Any]:
        """One POST, timed and counted by outcome, its failure classed as transient or final."""
        started = time.perf_counter()
        timeout = max(0.1, min(self.attempt_seconds, deadline - time.monotonic()))
        try:
            reply = http_json(
                self.session,
                "POST",
                self.endpoint.url(self.endpoint.answer_path),
                body=self.endpoint.wire_body(body),
                headers=self.endpoint.headers(request_id),
                timeout=timeout,
            )
            payload = self.endpoint.read_reply(reply, body, time.perf_counter() - started)
        except (requests.RequestException, ServiceError) as error:
            failure = connection_failure(error, timeout)
            MODEL_REQUESTS.labels(attempt_outcome(failure)).inc()
            raise failure from None
        else:
            MODEL_REQUESTS.labels("ok").inc()
            return payload
        finally:
            MODEL_SECONDS.observe(time.perf_counter() - started)

    # -- the /health probe

    def reachability(self) -> str:
        """The latest probe's verdict; a stale one starts a new probe beside the request."""
        if not self.config.openai_configured:
            return "not configured"
        with self.probe_lock:
            due = not self.probing and self.clock() >= self.probe_due
            self.probing = self.probing or due
            verdict = self.probe_verdict
        if due:
            threading.Thread(target=self.probe, name="openai-probe", daemon=True).start()
        return verdict

    def probe(self) -> None:
        """``GET /models/{model}``: is the server there, is the key good, is the model known."""
        verdict = "unreachable"
        try:
            reply = http_json(
                self.session,
                "GET",
                self.endpoint.url(f"models/{quote(self.config.openai_model, safe='')}"),
                headers=self.endpoint.headers(),
                timeout=min(self.attempt_seconds, PROBE_TIMEOUT_SECONDS),
            )
            verdict = probe_verdict(reply.status)
            if reply.status == 200:
                self.shutdown.watch(shutdown_in(reply.json_or_none()))
            elif reply.status == 404 and self.listed():
                verdict = "reachable"
        except requests.RequestException as error:
            logger.info(
                "The vision model's server did not answer the probe: %s", type(error).__name__
            )
        except Exception:
            # The probe runs in a thread of its own: whatever goes wrong is logged, and /health
            # goes on showing a verdict rather than waiting on a probe that died.
            logger.exception("The model probe failed")
        finally:
            with self.probe_lock:
                self.probe_verdict = verdict
                self.probe_due = self.clock() + self.config.openai_probe_seconds
                self.probing = False

    def listed(self) -> bool:
        """Whether ``GET /models`` lists the model: servers such as llama.cpp's answer 404 to
        ``GET /models/{model}`` for every model, and only list what they serve."""
        try:
            reply = http_json(
                self.session,
                "GET",
                self.endpoint.url("models"),
                headers=self.endpoint.headers(),
                timeout=min(self.attempt_seconds, PROBE_TIMEOUT_SECONDS),
            )
        except requests.RequestException:
            return False
        return reply.status == 200 and (
            self.config.openai_model in listed_model_names(reply.json_or_none())
        )

    def announced_shutdown(self) -> str:
        """The model's shutdown date as the latest answer gave it, or what stands for none."""
        return self.shutdown.announced()

    def count_shutdown_days(self, days_left: int) -> None:
        """Show the days left before the model shuts down (no series until a date is known)."""
        MODEL_SHUTDOWN_DAYS.labels(self.config.openai_model).set(days_left)


# ---------------------------------------------------------------------------------------------
# Nutrition from USDA SR28 (the table in nutrition.py counts what the model names)
# ---------------------------------------------------------------------------------------------

MAX_FOODS = 50


@functools.cache
def load_nutrition_table(directory: str) -> NutritionTable:
    """USDA SR28 from a folder, loaded once per process (in gunicorn's master)."""
    return NutritionTable.load(directory)


def nutrition_table(config: Config) -> NutritionTable | None:
    """The table items are counted from, or None when counting is off; a bad copy stops the start.

    The copy bundled with the service unless ``USDA_SR28_DIR`` names another.
    """
    if config.nutrition_source == "model":
        return None
    try:
        return load_nutrition_table(config.usda_sr28_dir or str(BUNDLED_SR28))
    except NutritionDataError as error:
        raise ConfigError([f"{table_copy(config)}: {error}"]) from None


def table_copy(config: Config) -> str:
    """Which copy of SR28 the service counts from, in words /health can show."""
    return "USDA_SR28_DIR" if config.usda_sr28_dir else "bundled"


def nutrition_check(config: Config, table: NutritionTable | None) -> str:
    """``checks.nutrition``: the table, its copy and identity; or why nothing is counted."""
    if table is None:
        return "off (NUTRITION_SOURCE=model)"
    return f"{table.label[:-1]}, {table_copy(config)}, {table.identity})"


# ---------------------------------------------------------------------------------------------
# User Service
# ---------------------------------------------------------------------------------------------


USER_SERVICE_ATTEMPTS = 2
# An entry id longer than this is not an id: the answer is taken as a failure to store.
MAX_ENTRY_ID = 200
USER_SERVICE_RETRY_WAIT = 0.2


class UserService:
    """The User Service, one client per app: stores analyses as the caller's food entries.

    A save is retried only when it never reached the service (the connection was refused or not
    made in time), so a retry cannot store an entry twice; the caller's ``Idempotency-Key``
    travels along so the service can deduplicate on its side.
    """

    def __init__(self, config: Config, session: requests.Session) -> None:
        self.session = session
        self.url = f"{config.user_service_url}/food-entries"
        self.timeout = config.user_service_timeout
        self.retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(USER_SERVICE_ATTEMPTS)
            | tenacity.stop_after_delay(self.timeout),
            wait=tenacity.wait_fixed(USER_SERVICE_RETRY_WAIT),
            retry=tenacity.retry_if_exception(never_sent),
            reraise=True,
        )

    def save(self, analysis: Analysis, form: AnalysisForm, caller: Caller, request_id: str) -> str:
        """Store the analysis as the caller's food entry; return the new entry's id."""
        headers = {"Authorization": caller.authorization, "X-Request-ID": request_id}
        if form.idempotency_key:
            headers["Idempotency-Key"] = form.idempotency_key
        where = public_url(self.url)
        try:
            reply = self.retrying(
                http_json,
                self.session,
                "POST",
                self.url,
                body=food_entry(analysis, caller.user_id, form.digest, form.digests),
                headers=headers,
                timeout=self.timeout,
            )
        except requests.RequestException as error:
            problem = user_service_problem(error, self.timeout)
            logger.error("Error saving food entry to user service at %s: %s", where, problem)
            USER_SERVICE_REQUESTS.labels("unreachable").inc()
            raise UserServiceError(
                f"the User Service at {where} {problem}", as_contract(analysis)
            ) from None
        entry_id = created_entry_id(reply)
        USER_SERVICE_REQUESTS.labels("error" if entry_id is None else "ok").inc()
        if entry_id is None:
            logger.error("Error saving food entry to user service: HTTP %s", reply.status)
            raise UserServiceError(
                f"the User Service did not store the entry (HTTP {reply.status})",
                as_contract(analysis),
            )
        return entry_id


def created_entry_id(response: UpstreamReply) -> str | None:
    """The ``id`` (or ``entryId``) of a 200/201 answer, else None."""
    if response.status not in (200, 201):
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    entry_id = body.get("id", body.get("entryId"))
    if isinstance(entry_id, bool) or not isinstance(entry_id, (str, int)) or entry_id == "":
        return None
    text = str(entry_id) if isinstance(entry_id, str) or abs(entry_id) < 10**MAX_ENTRY_ID else ""
    return text if 0 < len(text) <= MAX_ENTRY_ID else None


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


@dataclass
class Services:
    """The collaborators one app uses, kept in ``app.extensions``."""

    config: Config
    store: Store
    cache: AnalysisCache
    idempotency: IdempotencyRecords
    flights: SingleFlight
    decode_budget: DecodeBudget
    model_slots: ModelSlots
    model: VisionModel
    user_service: UserService
    products: ProductLookup
    started_at: float
    table: NutritionTable | None = None
    openapi: dict[str, Any] = field(default_factory=dict)

    def table_or_503(self) -> NutritionTable:
        """The nutrition table, or 503 ``nutrition_not_configured``."""
        if self.table is None:
            raise NutritionNotConfigured(
                "counting from USDA SR28 is turned off (NUTRITION_SOURCE=model): unset "
                "NUTRITION_SOURCE to count from the bundled table"
            )
        return self.table


def current_services() -> Services:
    """The current app's collaborators."""
    return cast(Services, current_app.extensions[SERVICE_NAME])


bp = Blueprint("image_service", __name__)


@bp.post("/analyze-food")
@token_required
def analyze_food() -> Response:
    """Analyze an uploaded meal photo; with ``save=true`` also store it as a food entry."""
    services = current_services()
    form = read_analysis_form(services.config.max_images)
    places = [photo.positions for photo in form.photos]
    with services.idempotency.guard(
        g.caller.user_id, form.idempotency_key, form.fingerprint
    ) as guard:
        if guard.replay is not None:
            return replayed(for_caller(guard.replay, places))
        analysis, source = cached_or_fresh(services, form)
        entry_id = None
        if form.save:
            entry_id = services.user_service.save(
                in_upload_order(analysis, places), form, g.caller, g.request_id
            )
        # Kept with the photos numbered in the set's fixed order; each answer renumbers them.
        kept = guard.answer({"analysis": as_contract(analysis, entry_id), "source": source})
        return jsonify(for_caller(kept, places))


def for_caller(response: Mapping[str, Any], places: Sequence[Sequence[int]]) -> dict[str, Any]:
    """A response with its items' photos numbered in this caller's upload order."""
    analysis = cast(Analysis, response["analysis"])
    return {**response, "analysis": in_upload_order(analysis, places)}


def cached_or_fresh(services: Services, form: AnalysisForm) -> tuple[Analysis, str]:
    """The analysis and its source: the cache, else one model call among concurrent misses.

    Requests that waited on another's model call (``SingleFlight``) answer with ``cache``.
    """
    table = services.table.identity if services.table else "no-table"
    private = private_inputs(form.wanted, g.caller.user_id)
    products = "openfoodfacts" if services.products.configured else "off"
    inputs = (f"table={table}", f"products={products}", *form.wanted.cache_inputs(), *private)
    key = cache_key_for(form.digest, services.config, *inputs)
    photo_count = len(form.photos)
    cached = sound_cached(services.cache, key, photo_count)
    if cached is not None:
        logger.info("Cache hit for %s", key)
        CACHE_EVENTS.labels("hit").inc()
        return food_only(cached), "cache"
    logger.info("Cache miss for %s", key)
    CACHE_EVENTS.labels("miss").inc()
    analysis, computed = services.flights.run(
        key,
        lambda: fresh_analysis(services, form, key),
        lambda: sound_cached(services.cache, key, photo_count),
    )
    return food_only(analysis), fresh_source(analysis) if computed else "cache"


def fresh_source(analysis: Mapping[str, Any]) -> str:
    """``api`` for an answer the model gave; ``openfoodfacts`` for one made from products alone
    (it names no model)."""
    return "api" if "model" in analysis else "openfoodfacts"


def sound_cached(cache: AnalysisCache, key: str, photo_count: int) -> dict[str, Any] | None:
    """The cached analysis of a set of ``photo_count`` photos; a miss (the fresh one replaces it)
    when it fails an answer's checks."""
    cached = cache.get(key)
    if cached is None or stored_analysis_is_sound(cached, photo_count):
        return cached
    logger.warning("Ignoring a cached analysis that does not validate: %s", key)
    return None


def fresh_analysis(services: Services, form: AnalysisForm, key: str) -> dict[str, Any]:
    """Decode the photos within the decode budget and read their barcodes; answer from the
    products when every photo shows a known one, else ask the model within a slot; cache it.

    An answer made while Open Food Facts could not be asked is sent but not cached.
    """
    prepared = prepare_photos(
        form.photos, services.config, services.decode_budget, scan=services.products.configured
    )
    found = look_up_products(services.products, prepared)
    try:
        shown = products_shown(found.products, prepared)
        if shown and not form.wanted.note:
            analysis = products_analysis(shown, len(prepared))
        else:
            with services.model_slots.hold():
                answer = services.model.analyze(
                    [photo.jpeg for photo in prepared],
                    form.wanted,
                    g.request_id,
                    list(found.products.values()),
                )
            analysis = final_analysis(answer.analysis, services.table, found.products)
    except NotFood:
        services.cache.set(key, as_cached(NOT_FOOD))
        raise
    except (UpstreamError, UpstreamRateLimited, AINotConfigured, Overloaded) as error:
        logger.error("Error analyzing food image: %s", error.message)
        raise
    analysis["warnings"] = [*analysis["warnings"], *found.warnings]
    cached = as_cached(analysis)
    if found.complete:
        services.cache.set(key, cached)
    return cached


@dataclass(frozen=True)
class ProductsFound:
    """The products a request's barcodes name, what went wrong asking, and whether all was asked."""

    products: dict[str, Product]
    warnings: list[str]
    complete: bool


# At most this many distinct codes of one request are looked up.
MAX_CODES_LOOKED_UP = 5


def look_up_products(lookup: ProductLookup, prepared: Sequence[PreparedImage]) -> ProductsFound:
    """Each distinct barcode of the photos looked up; a failure is a warning, never an error."""
    codes = list(dict.fromkeys(code for photo in prepared for code in photo.barcodes))
    products: dict[str, Product] = {}
    warnings: list[str] = []
    complete = True
    for code in codes[:MAX_CODES_LOOKED_UP]:
        try:
            product = lookup.find(code)
        except (ProductLookupError, UpstreamRateLimited) as error:
            logger.warning("Product lookup for barcode %s failed: %s", code, error.message)
            warnings.append(f"barcode {code}: {error.message}; the model estimated it instead")
            complete = False
            continue
        if product is None:
            warnings.append(
                f"barcode {code}: no product in Open Food Facts; the model estimated it"
            )
        else:
            products[code] = product
    return ProductsFound(products, warnings, complete)


def products_shown(
    products: Mapping[str, Product], prepared: Sequence[PreparedImage]
) -> list[tuple[Product, list[int]]]:
    """Each product with the photos (fixed order) that show it, when every photo shows one;
    else ``[]``."""
    if not products or not all(
        any(code in products for code in photo.barcodes) for photo in prepared
    ):
        return []
    return [
        (
            product,
            [number for number, photo in enumerate(prepared, 1) if code in photo.barcodes],
        )
        for code, product in products.items()
    ]


def prepare_photos(
    photos: Sequence[Photo], config: Config, budget: DecodeBudget, *, scan: bool = False
) -> list[PreparedImage]:
    """Each photo prepared for the model (its barcodes read when ``scan``), in order; several
    are prepared at once (Pillow decodes without the GIL), each within the decode budget. A
    photo that fails is named in the error."""

    def prepare(photo: Photo) -> PreparedImage:
        try:
            return prepare_image(
                photo.data, config.image_max_side, config.image_max_pixels, budget, scan=scan
            )
        except BadRequest as error:
            if len(photos) == 1:
                raise
            raise BadRequest(f"{photo.named}: {error.message}", code=error.code) from error

    if len(photos) == 1:
        return [prepare(photos[0])]
    with concurrent.futures.ThreadPoolExecutor(len(photos), "prepare-photo") as pool:
        futures = [pool.submit(prepare, photo) for photo in photos]
        # The first failing photo in the caller's order is the one named.
        in_order = sorted(zip(photos, futures, strict=True), key=lambda pair: pair[0].positions[0])
        for _, future in in_order:
            failure = future.exception()
            if failure is not None:
                raise failure
        return [future.result() for future in futures]


def food_only(cached: dict[str, Any]) -> Analysis:
    """The cached analysis, or NotFood for a cached verdict that the photo shows no food."""
    verdict = from_cached(cached)
    if isinstance(verdict, NotFoodVerdict):
        raise verdict.refusal()
    return verdict


def replayed(response: Mapping[str, Any]) -> Response:
    """The first response to an Idempotency-Key, sent again and marked so."""
    answer = jsonify(response)
    answer.headers["Idempotent-Replayed"] = "true"
    return answer


def stored_response_is_sound(response: Mapping[str, Any]) -> bool:
    """Whether a first response read back is one ``analyze_food`` could have sent with a save."""
    analysis = response.get("analysis")
    sources = ("api", "cache", "openfoodfacts")
    if set(response) != {"analysis", "source"} or response["source"] not in sources:
        return False
    if not isinstance(analysis, dict):
        return False
    entry_id = analysis.get("entryId")
    if not isinstance(entry_id, str) or not 0 < len(entry_id) <= MAX_ENTRY_ID:
        return False
    rest = {name: value for name, value in analysis.items() if name != "entryId"}
    return not isinstance(from_cached(rest), NotFoodVerdict) and stored_analysis_is_sound(rest)


OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")


@bp.post("/nutrition")
@token_required
def nutrition() -> Response:
    """The analysis of items the caller names or picks, counted from the table; no model call."""
    table = current_services().table_or_503()
    analysis = nutrition_analysis(table, read_nutrition_items())
    return jsonify(analysis=as_contract(analysis), source="usda-sr28")


def read_json_body() -> Any:
    """The JSON body: 415 in another media type, 413 past ``MAX_UPLOAD_MB``, 400 when not JSON."""
    if not request.is_json:
        raise UnsupportedMediaType(
            "send the items as JSON, with Content-Type: application/json "
            f"(got {request.mimetype[:60] or 'no Content-Type'})"
        )
    data = request.get_data(cache=False)
    limit = request.max_content_length
    if limit is not None and len(data) >= limit:
        raise RequestEntityTooLarge()  # werkzeug stops a chunked body there without a word
    try:
        return parse_json(data)
    except ValueError as error:
        raise BadRequest(
            f"the body is not JSON ({str(error)[:100]})", code=ErrorCode.BAD_REQUEST
        ) from None


def read_nutrition_items() -> list[Mapping[str, Any]]:
    """The ``items`` of a ``POST /nutrition`` body, each an object."""
    body = read_json_body()
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise BadRequest(
            'send JSON {"items": [{"name": "grilled salmon", "grams": 150}]} or '
            '{"items": [{"ndbNo": "15237", "grams": 150}]}'
        )
    if len(items) > MAX_ITEMS:
        raise BadRequest(f"send at most {MAX_ITEMS} items, got {len(items)}")
    if not all(isinstance(item, dict) for item in items):
        raise BadRequest("each item must be an object with a name or an ndbNo, and grams")
    return items


@bp.get("/foods")
@token_required
def foods() -> Response:
    """USDA SR28 foods whose descriptions match ``q``, best first: a picker for apps."""
    table = current_services().table_or_503()
    query = (request.args.get("q") or "").strip()
    if not query or len(query) > MAX_NAME_LENGTH:
        raise BadRequest(f"q must be 1 to {MAX_NAME_LENGTH} characters, e.g. q=salmon")
    limit = request.args.get("limit", "10")
    if not re.fullmatch(r"[0-9]{1,3}", limit) or not 1 <= int(limit) <= MAX_FOODS:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_FOODS}, got {limit[:10]!r}")
    found = [
        {
            "ndbNo": food.ndb_no,
            "usdaDescription": food.description,
            "commonName": food.common_name,
            "group": food.group,
            "kcalPer100g": food.kcal_per_100g,
        }
        for food in table.search(query, int(limit))
    ]
    return jsonify(foods=found)


@bp.get("/products/<barcode>")
@token_required
def product(barcode: str) -> Response:
    """A packaged product by the barcode an app's own scanner read, from Open Food Facts."""
    lookup = current_services().products
    code = lookup_form(barcode)
    if code is None:
        raise BadRequest(
            "barcode must be an EAN-13 (13 digits), UPC-A (12) or EAN-8 (8) code with a valid "
            f"check digit, got {barcode[:20]!r}"
        )
    found = lookup.find(code)
    if found is None:
        raise ProductNotFound(f"Open Food Facts has no product with energy for barcode {code}")
    return jsonify(product=found.as_json())


@bp.get("/health")
def health() -> tuple[Response, int]:
    """Readiness: the state of every dependency; 503 when one is unusable after start-up."""
    services = current_services()
    config = services.config
    checks = {
        "redis": services.store.health(),
        "openai": "configured" if config.openai_configured else "missing credentials",
        "jwt": "configured" if config.jwt_configured else "missing secret",
        "openai_probe": services.model.reachability(),
        "openai_model_shutdown": services.model.announced_shutdown(),
        "store": services.store.describe(),
        "products": "openfoodfacts" if services.products.configured else "off",
        "nutrition": nutrition_check(config, services.table),
    }
    healthy = checks["redis"] in ("connected", "not configured") and config.openai_configured
    startup_mode = time.monotonic() - services.started_at < config.startup_grace_seconds
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "service": SERVICE_NAME,
        "startup_mode": startup_mode,
        "checks": checks,
    }
    return jsonify(body), 200 if healthy or startup_mode else 503


@bp.get("/health/live")
def health_live() -> Response:
    """Liveness: the process serves requests."""
    return jsonify(status="alive")


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics, for scrapers inside the network (keep it off the public gateway)."""
    return Response(metrics_text(), content_type=prometheus_client.CONTENT_TYPE_LATEST)


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 description of this service, from ``openapi.yaml``."""
    document = current_services().openapi
    if not document:
        document.update(yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8")))
    return jsonify(document)


# ---------------------------------------------------------------------------------------------
# Request lifecycle and error handling
# ---------------------------------------------------------------------------------------------


def start_request() -> None:
    """Take or make the request id and start the clock."""
    supplied = request.headers.get("X-Request-ID", "")
    g.request_id = supplied if REQUEST_ID_PATTERN.fullmatch(supplied) else uuid.uuid4().hex
    g.started = time.perf_counter()


def finish_request(response: Response) -> Response:
    """Return the request id and log one line for the request."""
    response.headers["X-Request-ID"] = g.get("request_id", "-")
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    method = request.method if request.method in KNOWN_METHODS else "other"
    REQUESTS.labels(endpoint, method, str(response.status_code)).inc()
    REQUEST_SECONDS.labels(endpoint).observe(seconds)
    logger.info(
        "%s %s %s %.1fms", request.method, request.path, response.status_code, seconds * 1000
    )
    return response


def error_response(error: ServiceError) -> tuple[Response, int, dict[str, str]]:
    """The contract's JSON for a ServiceError."""
    return jsonify(error.body()), error.status, error.headers()


# Methods counted by name in the metrics; any other a caller invents is counted as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ENDPOINTS = (
    "POST /analyze-food, POST /nutrition, GET /foods, GET /health, GET /health/live, "
    "GET /openapi.json and GET /metrics"
)
HTTP_ERROR_CODES = {
    400: ErrorCode.BAD_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


def body_framing() -> str:
    """How the request's body is framed, as error messages name it."""
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    return "chunked body" if chunked else "body"


def http_error_response(error: HTTPException) -> tuple[Response, int, dict[str, str]]:
    """JSON instead of Werkzeug's HTML for routing and protocol errors."""
    status = error.code or 500
    allowed = list(getattr(error, "valid_methods", None) or [])
    if status == 413:
        message = too_large_message(current_services().config)
    elif status == 404:
        message = f"there is no {request.path[:100]!r} here; the service answers {ENDPOINTS}"
    elif status == 405:
        message = (
            f"{request.method[:20]} is not allowed on {request.path[:100]}; use "
            f"{' or '.join(m for m in allowed if m not in ('HEAD', 'OPTIONS'))} "
            f"(the service answers {ENDPOINTS})"
        )
    elif isinstance(error, ClientDisconnected):
        message = f"the {body_framing()} ended before it was complete"
    else:
        message = error.description or error.name
    headers = {"Allow": ", ".join(allowed)} if status == 405 and allowed else {}
    code = HTTP_ERROR_CODES.get(status, ErrorCode.HTTP_ERROR)
    return jsonify(error=message, code=str(code)), status, headers


def too_large_message(config: Config) -> str:
    """Which of the body limits a 413 is about."""
    limit = config.max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        return f"the request body is larger than {config.max_upload_mb:g} MB"
    if body_framing() == "chunked body" and request.stream.tell() >= limit:
        return f"the chunked request body is larger than {config.max_upload_mb:g} MB"
    return (
        f"the form is too large: at most {config.max_upload_mb:g} MB in all, "
        f"{MAX_FORM_PARTS} parts and {MAX_FORM_FIELD_BYTES // 1024} KiB per text field"
    )


# What gunicorn raises, while the app reads a body, about framing it cannot parse.
BODY_FRAMING_PROBLEMS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], str], ...] = (
    (
        InvalidChunkSize,
        "invalid chunk size (hexadecimal digits, on a line no longer than a header)",
    ),
    (InvalidChunkExtension, "invalid chunk extension"),
    (ChunkMissingTerminator, "a chunk's data is not followed by CRLF"),
    ((InvalidHeader, InvalidHeaderName, ObsoleteFolding), "invalid trailer"),
)


def unreadable_body_response(error: Exception) -> tuple[Response, int]:
    """JSON for a body gunicorn cannot read: 431 for trailers past its header limits, else 400."""
    framing = body_framing()
    if isinstance(error, LimitRequestHeaders):
        message = (
            f"the {framing}'s trailers are too large: at most GUNICORN_LIMIT_REQUEST_FIELD_SIZE "
            "bytes a line and GUNICORN_LIMIT_REQUEST_FIELDS lines"
        )
        return jsonify(error=message, code=str(ErrorCode.HEADER_TOO_LARGE)), 431
    problem = next(
        (words for kinds, words in BODY_FRAMING_PROBLEMS if isinstance(error, kinds)),
        "its framing cannot be parsed",
    )
    message = f"the {framing} could not be read: {problem}"
    return jsonify(error=message, code=str(ErrorCode.BAD_REQUEST)), 400


def unexpected_error_response(error: Exception) -> tuple[Response, int]:
    """Log a bug with its traceback; tell the caller only that it happened."""
    logger.exception("Unhandled error while serving %s %s", request.method, request.path)
    body = InternalError("an internal error occurred; quote the X-Request-ID when reporting it")
    return jsonify(body.body()), body.status


# ---------------------------------------------------------------------------------------------
# Application factory
# ---------------------------------------------------------------------------------------------


def startup_summary(config: Config) -> list[str]:
    """What the service was configured with, in a few lines without a secret; warnings last."""
    table = nutrition_table(config)  # loaded already: the start checked it
    if config.redis_url:
        store = f"Redis at {public_url(config.redis_url)}"
    elif config.redis_host:
        store = f"Redis at {config.redis_host}:{config.redis_port}/{config.redis_db}"
    else:
        store = f"embedded at {config.store_file} (no REDIS_URL or REDIS_HOST)"
    if config.uses_public_key:
        keys = "a public key" if config.jwt_public_key else "no public key (JWT_PUBLIC_KEY)"
    else:
        keys = "a secret" if config.jwt_secret else "no secret (JWT_SECRET)"
    lines = [
        f"Image Service: model {config.openai_model} at {public_url(config.openai_base_url)}; "
        f"cache and locks {store}; User Service at {public_url(config.user_service_url)}; "
        f"tokens {', '.join(config.jwt_algorithms)} with {keys}; nutrition "
        + (
            f"counted from {table.label[:-1]}, {table.identity}) at "
            f"{config.usda_sr28_dir or BUNDLED_SR28}"
            if table is not None
            else "from the model (NUTRITION_SOURCE=model)"
        )
        + "; packaged products "
        + (
            f"from Open Food Facts at {public_url(config.openfoodfacts_url)}"
            if config.openfoodfacts_url
            else "not looked up (OPENFOODFACTS_URL is empty)"
        )
    ]
    if config.openfoodfacts_url and "(" not in config.openfoodfacts_user_agent:
        lines.append(
            "OPENFOODFACTS_USER_AGENT names no contact: Open Food Facts asks every client for "
            f"one, e.g. '{OPENFOODFACTS_USER_AGENT} (ops@example.com)'"
        )
    if not config.openai_configured:
        lines.append(
            "No model is configured: /analyze-food answers 503 until OPENAI_API_KEY is set "
            "(for a local server such as Ollama, any value, with OPENAI_BASE_URL pointing at it)"
        )
    return lines


def warn_about_weak_settings(config: Config) -> None:
    """Say at start what works but should not run in production."""
    secret = config.jwt_secret
    if not config.uses_public_key and secret and len(secret.encode()) < MIN_HS_SECRET_BYTES:
        logger.warning(
            "JWT_SECRET is shorter than %d bytes; HS256 needs a longer random secret",
            MIN_HS_SECRET_BYTES,
        )
    if not config.jwt_configured:
        logger.warning("No JWT key is configured: every protected call will answer 401")


def create_app(
    config: Config | None = None,
    *,
    today: Callable[[], date] | None = None,
    clock: Callable[[], float] = time.monotonic,
    probe_clock: Callable[[], float] | None = None,
) -> Flask:
    """Build the service; it connects lazily.

    ``clock`` is the monotonic time the Redis breaker and the model probe read, and ``today`` the
    date the model's shutdown is counted from: tests move them rather than sleep.
    ``probe_clock``, the older name, sets the probe's clock alone.
    """
    config = config or Config.from_env(os.environ)
    configure_logging(config)
    app = Flask(__name__, static_folder=None)
    app.request_class = UploadRequest
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config.update(
        MAX_CONTENT_LENGTH=config.max_upload_bytes,
        MAX_FORM_MEMORY_SIZE=MAX_FORM_FIELD_BYTES,
        MAX_FORM_PARTS=MAX_FORM_PARTS,
    )
    warn_about_weak_settings(config)
    store, records = build_stores(
        redis_settings(config),
        config.store_file,
        int(config.store_max_mb * MIB),
        scope=request_scope,
        count=count_cache_event,
        clock=clock,
    )
    app.extensions[SERVICE_NAME] = Services(
        config=config,
        store=store,
        cache=AnalysisCache(store, config.cache_ttl_seconds),
        idempotency=IdempotencyRecords(
            records, config.single_flight_lock_seconds, stored_response_is_sound
        ),
        flights=SingleFlight(
            records,
            config.single_flight_lock_seconds,
            config.worst_request_seconds,
            count=count_single_flight,
        ),
        decode_budget=DecodeBudget(config.decode_budget_mb, config.model_queue_timeout),
        model_slots=ModelSlots(config.model_max_concurrency, config.model_queue_timeout),
        model=VisionModel(
            config,
            build_session(config.model_max_concurrency),
            records,
            today,
            probe_clock or clock,
        ),
        user_service=UserService(config, build_session(config.model_max_concurrency)),
        products=ProductLookup(
            store,
            build_session(config.model_max_concurrency),
            url=config.openfoodfacts_url,
            user_agent=config.openfoodfacts_user_agent,
            timeout=config.openfoodfacts_timeout,
            rate_per_minute=config.openfoodfacts_rate,
            found_ttl=config.openfoodfacts_found_seconds,
            missing_ttl=config.openfoodfacts_missing_seconds,
        ),
        started_at=time.monotonic(),
        table=nutrition_table(config),
    )
    app.extensions[ACCESS_TOKENS] = AccessTokens(config, jwt_verification_key(config))
    CORS(
        app,
        origins=list(config.cors_origins),
        expose_headers=["X-Request-ID", "Retry-After", "Idempotent-Replayed"],
    )
    app.before_request(start_request)
    app.after_request(finish_request)
    app.register_error_handler(ServiceError, error_response)
    app.register_error_handler(HTTPException, http_error_response)
    app.register_error_handler(ParseException, unreadable_body_response)
    app.register_error_handler(Exception, unexpected_error_response)
    app.register_blueprint(bp)
    return app


@functools.cache
def default_app() -> Flask:
    """The app ``gunicorn app:app`` serves, configured from the environment on first use."""
    return create_app()


def __getattr__(name: str) -> Any:
    """``app.app`` builds the default app when first asked for, so importing builds nothing."""
    if name == "app":
        return default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
