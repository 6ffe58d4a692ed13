"""Locks over a store: one model call per analysis at a time, and Idempotency-Key records.

``SingleFlight`` lets one request compute an analysis while the others wait for its result;
``IdempotencyRecords`` keeps the first response to a ``save=true`` request for its retries. Both
hold their key with a ``heartbeat``; neither knows of Flask: the caller sends what they return.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

from errors import (
    ErrorCode,
    IdempotencyKeyInProgress,
    IdempotencyKeyReused,
    RecordsUnavailable,
    ServiceError,
    UpstreamTimeout,
)
from store import Store, StoreUnavailable, decode_cached, not_counted

logger = logging.getLogger("image_service")


@contextlib.contextmanager
def heartbeat(store: Store, key: str, value: str, seconds: float) -> Iterator[None]:
    """Renew ``key`` while the block runs and it still holds ``value``.

    A holder that dies stops renewing, so its key expires within ``seconds`` and another
    request can take over.
    """
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 3):
            with contextlib.suppress(StoreUnavailable):
                store.extend_if(key, value, seconds)

    threading.Thread(target=renew, name="heartbeat", daemon=True).start()
    try:
        yield
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------
# Idempotency guard (Idempotency-Key on saves)
# ---------------------------------------------------------------------------------------------


IDEMPOTENCY_PREFIX = "idempotency:"
IDEMPOTENCY_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class IdempotencyClaim:
    """What a request carrying an Idempotency-Key may do: go ahead, or replay a response."""

    key: str | None
    token: str
    replay: dict[str, Any] | None = None


@dataclass
class IdempotencyGuard:
    """One request's hold on its Idempotency-Key: a replay to send, or the response to keep."""

    records: IdempotencyRecords | None = None
    claim: IdempotencyClaim | None = None
    fingerprint: str = ""

    @property
    def replay(self) -> dict[str, Any] | None:
        """The first response to the key, when this request is a retry of it."""
        return self.claim.replay if self.claim else None

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """Keep the response for the key's retries; the body to send."""
        if self.records is not None and self.claim is not None:
            self.records.complete(self.claim, self.fingerprint, body)
        return body


class IdempotencyRecords:
    """First responses of ``save=true`` requests by user and Idempotency-Key, kept for 24 h.

    ``sound`` tells a first response the service could have sent from one planted in the store.
    """

    def __init__(
        self, store: Store, pending_seconds: float, sound: Callable[[Mapping[str, Any]], bool]
    ) -> None:
        self.store = store
        self.pending_seconds = pending_seconds
        self.sound = sound

    def claim(self, user_id: str, idempotency_key: str, digest: str) -> IdempotencyClaim:
        """Reserve the key for this request, or return the stored first response."""
        scope = f"{user_id}\0{idempotency_key}".encode()
        key = IDEMPOTENCY_PREFIX + hashlib.sha256(scope).hexdigest()
        token = uuid.uuid4().hex
        pending = pending_record(digest, token)
        record = None
        for _attempt in range(3):  # a record that expires or is dropped between the calls: again
            try:
                if self.store.add(key, pending, self.pending_seconds):
                    return IdempotencyClaim(key, token)
                record = self.read(key)
            except StoreUnavailable:
                break
            if record is not None:
                break
        if record is None:
            if self.store.refuses_unguarded_saves:
                raise RecordsUnavailable(
                    "the store that keeps Idempotency-Key records cannot be used just now",
                    retry_after=1,
                )
            logger.warning("Idempotency-Key not enforced: the store is unavailable")
            return IdempotencyClaim(None, token)
        if record.get("digest") != digest:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used with another photo, note or language"
            )
        if record.get("state") != "done":
            raise IdempotencyKeyInProgress(
                "a request with this Idempotency-Key is still being processed"
            )
        return IdempotencyClaim(None, token, replay=cast(dict[str, Any], record["response"]))

    def read(self, key: str) -> dict[str, Any] | None:
        """The key's record; one that is not a record the service writes is dropped (a miss)."""
        raw = self.store.get(key)
        record = decode_cached(raw)
        if raw is None or self.is_record(record):
            return record
        logger.warning("Dropping an Idempotency-Key record that does not validate")
        self.store.delete_if(key, raw)
        return None

    def is_record(self, record: dict[str, Any] | None) -> bool:
        """Whether a record read back is pending with a token, or done with a sound response."""
        if record is None or not isinstance(record.get("digest"), str):
            return False
        if record.get("state") == "pending":
            return isinstance(record.get("token"), str)
        response = record.get("response")
        return record.get("state") == "done" and isinstance(response, dict) and self.sound(response)

    @contextlib.contextmanager
    def guard(
        self, user_id: str, idempotency_key: str | None, fingerprint: str
    ) -> Iterator[IdempotencyGuard]:
        """Hold the request's Idempotency-Key, if it has one, while the request works on it.

        ``fingerprint`` names what the key was sent with (photo, note, language).

        A retry of a finished request gets its response to replay; a failure frees the key, so
        that a retry is processed afresh.
        """
        if idempotency_key is None:
            yield IdempotencyGuard()
            return
        claim = self.claim(user_id, idempotency_key, fingerprint)
        if claim.key is None:
            yield IdempotencyGuard(self, claim, fingerprint)
            return
        pending = pending_record(fingerprint, claim.token)
        try:
            with heartbeat(self.store, claim.key, pending, self.pending_seconds):
                yield IdempotencyGuard(self, claim, fingerprint)
        except Exception:
            self.release(claim, fingerprint)
            raise

    def complete(self, claim: IdempotencyClaim, digest: str, response: Mapping[str, Any]) -> None:
        """Keep the response the key's retries will get."""
        if claim.key is None:
            return
        record = {"state": "done", "digest": digest, "response": response}
        try:
            self.store.set(claim.key, json.dumps(record), IDEMPOTENCY_TTL_SECONDS)
        except StoreUnavailable:
            logger.warning("Idempotency-Key response not kept: the store is unavailable")

    def release(self, claim: IdempotencyClaim, digest: str) -> None:
        """Free the key after a failure, so a retry is processed afresh."""
        if claim.key is None:
            return
        with contextlib.suppress(StoreUnavailable):
            self.store.delete_if(claim.key, pending_record(digest, claim.token))


def pending_record(fingerprint: str, token: str) -> str:
    """The record of a key whose first request is still at work (renewed while it lives)."""
    return json.dumps({"state": "pending", "digest": fingerprint, "token": token})


# ---------------------------------------------------------------------------------------------
# Single flight
# ---------------------------------------------------------------------------------------------


LOCK_PREFIX = "lock:"
# What a lock holds: the holder's token (``uuid4().hex``); anything else was not written by one.
LOCK_TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")
FAILURE_PREFIX = "failed:"
FAILURE_NOTICE_SECONDS = 10
FOLLOW_POLL_INITIAL = 0.01
FOLLOW_POLL_MAX = 0.1


class SingleFlight:
    """One model call per analysis at a time, across threads, workers and replicas.

    The first request for a key takes a lock (``SET NX PX`` with a token, kept alive by a
    heartbeat while it works, released by compare-and-delete); the others poll the cache with
    backoff and pick up the result. If the holder dies, its lock expires and a waiter takes over;
    if it fails, the waiters get the same error instead of each calling the model in turn.
    """

    def __init__(
        self,
        store: Store,
        lock_seconds: float,
        wait_limit: float,
        *,
        count: Callable[[str], None] = not_counted,
    ) -> None:
        self.store = store
        self.lock_seconds = lock_seconds
        self.wait_limit = wait_limit
        self.count = count

    def run(
        self,
        key: str,
        compute: Callable[[], dict[str, Any]],
        read_result: Callable[[], dict[str, Any] | None],
    ) -> tuple[dict[str, Any], bool]:
        """The result for ``key`` and whether this request computed it."""
        lock_key, failure_key = LOCK_PREFIX + key, FAILURE_PREFIX + key
        deadline = time.monotonic() + self.wait_limit
        while True:
            token = uuid.uuid4().hex
            try:
                leader = self.store.add(lock_key, token, self.lock_seconds, self.lock_seconds)
            except StoreUnavailable:
                return compute(), True
            if leader:
                self.count("leader")
                with self.leading(lock_key, failure_key, token):
                    return compute(), True
            self.count("follower")
            try:
                result = self.follow(lock_key, failure_key, read_result, deadline)
            except StoreUnavailable:
                return compute(), True
            if result is not None:
                return result, False
            if time.monotonic() >= deadline:
                raise UpstreamTimeout("the analysis of this photo by another request is overdue")
            self.count("takeover")

    @contextlib.contextmanager
    def leading(self, lock_key: str, failure_key: str, token: str) -> Iterator[None]:
        """Hold the lock while the block computes; leave a short failure notice for the waiters."""
        try:
            with heartbeat(self.store, lock_key, token, self.lock_seconds):
                yield
        except ServiceError as error:
            notice = {
                "token": token,
                "status": error.status,
                "headers": error.headers(),
                **error.body(),
            }
            with contextlib.suppress(StoreUnavailable):
                self.store.set(failure_key, json.dumps(notice), FAILURE_NOTICE_SECONDS)
            raise
        finally:
            with contextlib.suppress(StoreUnavailable):
                self.store.delete_if(lock_key, token)

    def follow(
        self,
        lock_key: str,
        failure_key: str,
        read_result: Callable[[], dict[str, Any] | None],
        deadline: float,
    ) -> dict[str, Any] | None:
        """Wait for the holder's result; None when the lock is gone without one (take over)."""
        delay = FOLLOW_POLL_INITIAL
        holders: set[str] = set()
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, FOLLOW_POLL_MAX)
            result = read_result()
            if result is not None:
                return result
            holder = self.store.get(lock_key, self.lock_seconds)
            if holder is not None and LOCK_TOKEN_PATTERN.fullmatch(holder):
                holders.add(holder)
                continue
            if holder is not None:
                self.store.delete_if(lock_key, holder)
                return None
            result = read_result()
            if result is not None:
                return result
            notice = decode_cached(self.store.get(failure_key))
            if is_failure_notice(notice) and notice["token"] in holders:
                raise RelayedError(notice)
            return None
        return None


def is_failure_notice(notice: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    """Whether a failure notice read back is one ``SingleFlight.leading`` could have written."""
    if notice is None:
        return False
    status, headers = notice.get("status"), notice.get("headers", {})
    return (
        isinstance(notice.get("token"), str)
        and type(status) is int
        and 400 <= status <= 599
        and isinstance(notice.get("error"), str)
        and isinstance(notice.get("code"), str)
        and isinstance(headers, dict)
        and all(isinstance(value, str) for value in headers.values())
    )


def known_code(code: str) -> ErrorCode:
    """The holder's code, or ``upstream_error`` for one this service does not know."""
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.UPSTREAM_ERROR


class RelayedError(ServiceError):
    """The error the request that held the lock got, passed on to those that waited for it."""

    def __init__(self, notice: Mapping[str, Any]) -> None:
        super().__init__(str(notice.get("error", "")), code=known_code(str(notice.get("code", ""))))
        self.status = int(notice.get("status", 502))
        headers = notice.get("headers")
        self.extra_headers = {str(k): str(v) for k, v in (headers or {}).items()}
        self.extra = {
            name: value
            for name, value in notice.items()
            if name not in ("token", "status", "headers", "error", "code")
        }

    def body(self) -> dict[str, Any]:
        """The holder's error body."""
        return {**super().body(), **self.extra}

    def headers(self) -> dict[str, str]:
        """The holder's error headers (``Retry-After``, ``WWW-Authenticate``)."""
        return self.extra_headers
