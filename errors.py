"""The service's errors: each a value with an HTTP status and a stable code.

Raised deep down by any module; ``app.py``'s one handler turns them into the contract's JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Every stable ``code`` an error answer can carry; the README and openapi.yaml list these."""

    MISSING_IMAGE = "missing_image"
    EMPTY_IMAGE = "empty_image"
    TOO_MANY_IMAGES = "too_many_images"
    INVALID_IMAGE = "invalid_image"
    UNSUPPORTED_IMAGE_TYPE = "unsupported_image_type"
    INVALID_PARAMETER = "invalid_parameter"
    BAD_REQUEST = "bad_request"
    MISSING_TOKEN = "missing_token"  # noqa: S105 (codes, not secrets)
    INVALID_TOKEN = "invalid_token"  # noqa: S105
    TOKEN_EXPIRED = "token_expired"  # noqa: S105
    NOT_FOUND = "not_found"
    PRODUCT_NOT_FOUND = "product_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    IDEMPOTENCY_KEY_IN_PROGRESS = "idempotency_key_in_progress"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    URI_TOO_LONG = "uri_too_long"
    HEADER_TOO_LARGE = "header_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    NOT_FOOD = "not_food"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    HTTP_ERROR = "http_error"
    UPSTREAM_ERROR = "upstream_error"
    USER_SERVICE_ERROR = "user_service_error"
    PRODUCT_LOOKUP_ERROR = "product_lookup_error"
    AI_NOT_CONFIGURED = "ai_not_configured"
    NUTRITION_NOT_CONFIGURED = "nutrition_not_configured"
    PRODUCTS_NOT_CONFIGURED = "products_not_configured"
    OVERLOADED = "overloaded"
    STORE_UNAVAILABLE = "store_unavailable"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    INTERNAL_ERROR = "internal_error"


class ServiceError(Exception):
    """An error with an HTTP status and a stable code, answered as the contract's JSON."""

    status = 500
    code = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body callers receive."""
        return {"error": self.message, "code": str(self.code)}

    def headers(self) -> dict[str, str]:
        """Extra response headers."""
        return {}


class BadRequest(ServiceError):
    """The request cannot be processed as sent (400)."""

    status = 400
    code = ErrorCode.INVALID_PARAMETER


class UnsupportedMediaType(ServiceError):
    """The body is in a media type the endpoint does not take (415)."""

    status = 415
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class Unauthorized(ServiceError):
    """The bearer token is missing or not acceptable (401)."""

    status = 401
    code = ErrorCode.INVALID_TOKEN

    def headers(self) -> dict[str, str]:
        """RFC 6750 asks for a challenge on every 401."""
        return {"WWW-Authenticate": "Bearer"}


class IdempotencyKeyInProgress(ServiceError):
    """A request with the same Idempotency-Key is still being processed (409)."""

    status = 409
    code = ErrorCode.IDEMPOTENCY_KEY_IN_PROGRESS


class IdempotencyKeyReused(ServiceError):
    """An Idempotency-Key was sent again with a different photo (422)."""

    status = 422
    code = ErrorCode.IDEMPOTENCY_KEY_REUSED


class NotFood(ServiceError):
    """The model found no food in the photo (422)."""

    status = 422
    code = ErrorCode.NOT_FOOD


class UpstreamError(ServiceError):
    """The vision model failed, refused, or answered something unusable (502)."""

    status = 502
    code = ErrorCode.UPSTREAM_ERROR
    rejected_parameter: str | None = None


class TransientUpstreamError(UpstreamError):
    """A model failure worth another attempt, with the wait the server asked for, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamTimeout(TransientUpstreamError):
    """The vision model did not answer within its deadline (504)."""

    status = 504
    code = ErrorCode.UPSTREAM_TIMEOUT


class UserServiceError(ServiceError):
    """The User Service did not store the entry; the analysis travels with the error (502)."""

    status = 502
    code = ErrorCode.USER_SERVICE_ERROR

    def __init__(self, message: str, analysis: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.analysis = dict(analysis)

    def body(self) -> dict[str, Any]:
        """The error plus the analysis, so nothing the caller sent is lost."""
        return {**super().body(), "analysis": self.analysis}


class AINotConfigured(ServiceError):
    """No credentials for the vision model are configured (503)."""

    status = 503
    code = ErrorCode.AI_NOT_CONFIGURED


class NutritionNotConfigured(ServiceError):
    """No nutrition table is loaded, so there is nothing to look foods up in (503)."""

    status = 503
    code = ErrorCode.NUTRITION_NOT_CONFIGURED


class ProductNotFound(ServiceError):
    """Open Food Facts does not know the barcode, or knows no energy for it (404)."""

    status = 404
    code = ErrorCode.PRODUCT_NOT_FOUND


class ProductLookupError(ServiceError):
    """Open Food Facts could not be reached, failed, or answered something unusable (502)."""

    status = 502
    code = ErrorCode.PRODUCT_LOOKUP_ERROR


class ProductsNotConfigured(ServiceError):
    """No Open Food Facts URL is configured, so there is nothing to look barcodes up in (503)."""

    status = 503
    code = ErrorCode.PRODUCTS_NOT_CONFIGURED


class RetryLater(ServiceError):
    """Nothing is wrong with the request, but it cannot be served now; ``Retry-After`` says when."""

    status = 503

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        """When to come back, in whole seconds."""
        return {"Retry-After": str(self.retry_after)}


class Overloaded(RetryLater):
    """Too many model calls are in flight in this process; try again shortly (503)."""

    code = ErrorCode.OVERLOADED


class UpstreamRateLimited(RetryLater):
    """An upstream cannot be asked now: the model's server asked to wait longer than the service
    waits for it, or the minute's share of Open Food Facts lookups is spent (503)."""

    code = ErrorCode.UPSTREAM_RATE_LIMITED


class RecordsUnavailable(RetryLater):
    """The embedded store cannot keep Idempotency-Key records now; saving could repeat (503)."""

    code = ErrorCode.STORE_UNAVAILABLE


class InternalError(ServiceError):
    """A bug; the message says nothing about internals (500)."""


class ConfigError(ValueError):
    """The environment holds values the service cannot start with; ``problems`` names each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration: " + "; ".join(problems))
        self.problems = list(problems)
