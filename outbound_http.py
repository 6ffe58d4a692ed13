"""Outbound HTTP to the model and the User Service: ``http_json`` reads a whole answer in time.

``build_session`` makes the pooled ``requests.Session`` each client keeps; ``http_json`` sends one
request and reads its whole answer within one deadline and a size cap, as an ``UpstreamReply``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from json_values import parse_json

# Answers from the model and the User Service are a few kilobytes; anything past this is refused.
MAX_UPSTREAM_BYTES = 1024 * 1024
UPSTREAM_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class UpstreamReply:
    """An upstream's whole answer, read within one deadline."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not JSON (or absurdly nested)."""
        return parse_json(self.body)

    def json_or_none(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return self.json()
        except ValueError:
            return None


class AnswerTooSlow(requests.Timeout):
    """The answer kept trickling in past its deadline."""


class AnswerTooLarge(requests.RequestException):
    """The answer is larger than any sensible one."""


def http_json(
    session: requests.Session,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    timeout: float,
    body: Mapping[str, Any] | None = None,
) -> UpstreamReply:
    """Send a request (with a JSON body, if any) and read the whole answer within ``timeout``.

    ``requests`` bounds each socket read, not the answer, so a server dripping one byte at a
    time could hold a request forever; the body is read here against a deadline instead, and
    capped in size. A connection that fails mid-answer, whichever layer notices, is a
    ``requests.ConnectionError`` like any other.
    """
    deadline = time.monotonic() + timeout
    try:
        with session.request(
            method,
            url,
            json=body,
            headers=dict(headers),
            timeout=(min(timeout, 10.0), timeout),
            stream=True,
        ) as response:
            chunks: list[bytes] = []
            size = 0
            # read1 returns what one socket read brings, so the deadline is checked as bytes
            # arrive.
            while chunk := response.raw.read1(UPSTREAM_CHUNK_BYTES, decode_content=True):
                size += len(chunk)
                if size > MAX_UPSTREAM_BYTES:
                    raise AnswerTooLarge(f"the answer is larger than {MAX_UPSTREAM_BYTES} bytes")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise AnswerTooSlow(f"no complete answer within {timeout:g}s")
            return UpstreamReply(response.status_code, response.headers, b"".join(chunks))
    except urllib3.exceptions.ReadTimeoutError as error:
        raise requests.ReadTimeout(f"no answer within {timeout:g}s") from error
    except urllib3.exceptions.HTTPError as error:
        raise requests.ConnectionError(
            f"the connection failed mid-answer ({type(error).__name__})"
        ) from error


def public_url(url: str) -> str:
    """A URL without user information or query, fit for a message."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def never_sent(error: BaseException) -> bool:
    """Whether a request failed before reaching the server, so that sending it again is safe."""
    if isinstance(error, requests.ConnectTimeout):
        return True
    if not isinstance(error, requests.ConnectionError) or not error.args:
        return False
    return isinstance(getattr(error.args[0], "reason", None), urllib3.exceptions.NewConnectionError)


def user_service_problem(error: requests.RequestException, timeout: float) -> str:
    """What went wrong with a save, in words: unreachable, too slow, or too much."""
    if isinstance(error, requests.Timeout):
        return f"did not answer within {timeout:g}s"
    if isinstance(error, AnswerTooLarge):
        return "answered more than any entry needs"
    return f"could not be reached ({type(error).__name__})"


def build_session(pool_size: int) -> requests.Session:
    """A keep-alive session with a connection pool sized for the worker's threads."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
