"""Real collaborators for the tests: loopback HTTP servers, a silent TCP port and a Redis server.

Nothing here patches the code under test: the service talks to these over real sockets. Every
server starts in its constructor and must be stopped by whoever made it (`close()` / `stop()`, or
a `with` block), which the fixtures in conftest do.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import copy
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

Body = bytes | str | dict[str, Any] | list[Any] | None

LOOPBACK = "127.0.0.1"
DEFAULT_MODEL = "gpt-6-luna"
DEFAULT_ANALYSIS: dict[str, Any] = {
    "name": "Grilled Salmon with Asparagus",
    "calories": 450,
    "protein": 40,
    "carbs": 10,
    "fat": 25,
    "servingSize": "1 fillet, 6 spears",
    "ingredients": ["salmon", "asparagus", "olive oil"],
    "confidence": 0.92,
}
_CONNECTION_ERRORS = (ConnectionError, TimeoutError)  # resets and broken pipes from clients


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


class ClosesOnExit:
    """A with block closes it: ``with Server() as server: ...`` calls ``server.close()``."""

    def close(self) -> None:
        """Release everything it holds."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        """Use it in a with block."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close it."""
        self.close()


# ---------------------------------------------------------------- recorded requests and replies


@dataclass(frozen=True)
class RecordedRequest:
    """One request as a fake server received it; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float

    @property
    def route(self) -> str:
        """The path without its query string."""
        return self.path.partition("?")[0]

    def header(self, name: str, default: str | None = None) -> str | None:
        """A header's value by case-insensitive name (repeated headers joined by ", ")."""
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


@dataclass
class Reply:
    """What a fake server answers: a status and body, or a delay, or a dropped connection.

    `cut_after` sends the headers (with the whole body's Content-Length) and that many bytes of
    the body, then hangs up: a connection that fails mid-answer. `hold` keeps the answer back
    until the test sets it (or the server closes), for a call that must outlast a step.
    """

    status: int = 200
    body: Body = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    cut_after: int | None = None
    hold: threading.Event | None = None

    def encode(self) -> tuple[bytes, dict[str, str]]:
        """The body's bytes and the headers to send, with Content-Type and Content-Length."""
        if isinstance(self.body, dict | list):
            payload, content_type = json.dumps(self.body).encode(), "application/json"
        elif isinstance(self.body, str):
            payload, content_type = self.body.encode(), "text/plain; charset=utf-8"
        elif self.body is None:
            payload, content_type = b"", ""
        else:
            payload, content_type = bytes(self.body), "application/octet-stream"
        headers = {k: v for k, v in self.headers.items() if k.lower() != "content-length"}
        if content_type and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = content_type
        headers["Content-Length"] = str(len(payload))
        return payload, headers


def json_error(status: int, message: str) -> Reply:
    """A plain JSON error reply."""
    return Reply(status, {"error": message})


# ---------------------------------------------------------------- the recording HTTP server


class _RecordingHandler(BaseHTTPRequestHandler):
    """Reads one request, records it and sends the server's chosen reply."""

    protocol_version = "HTTP/1.1"
    # Small replies on a kept-alive connection would otherwise wait on Nagle's algorithm (~40 ms).
    disable_nagle_algorithm = True
    server: RecordingServer

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output free of access-log lines."""

    def do_GET(self) -> None:
        """Serve a GET."""
        self._serve()

    def do_POST(self) -> None:
        """Serve a POST."""
        self._serve()

    def do_PUT(self) -> None:
        """Serve a PUT."""
        self._serve()

    def do_PATCH(self) -> None:
        """Serve a PATCH."""
        self._serve()

    def do_DELETE(self) -> None:
        """Serve a DELETE."""
        self._serve()

    def _serve(self) -> None:
        """Record the request, wait if told to, then answer or hang up."""
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers=self._lowercase_headers(),
            body=self._read_body(),
            received_at=time.monotonic(),
        )
        reply = self.server.reply_to(request)
        if reply.delay > 0 and self.server.closing.wait(reply.delay):
            reply = Reply(drop=True)  # the server is closing: release the client at once
        while reply.hold is not None and not reply.hold.wait(0.05):
            if self.server.closing.is_set():
                reply = Reply(drop=True)
        self.server.note("answered", request)  # before sending, so it precedes what it causes
        if reply.drop:
            self.close_connection = True
            return
        payload, headers = reply.encode()
        self.send_response(reply.status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if reply.cut_after is not None:
            self.wfile.write(payload[: reply.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def _lowercase_headers(self) -> dict[str, str]:
        """Headers by lower-cased name, repeated ones joined as HTTP allows."""
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return headers

    def _read_body(self) -> bytes:
        """The request body, framed by Content-Length or chunked encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        """A chunked body, trailers skipped."""
        chunks: list[bytes] = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(chunks)


class RecordingServer(ClosesOnExit, ThreadingHTTPServer):
    """A loopback HTTP/1.1 server in a daemon thread that records requests and plays replies."""

    daemon_threads = True
    request_queue_size = 128  # the default 5 makes bursts of parallel clients wait for SYN retries
    routes: ClassVar[frozenset[tuple[str, str]]] = frozenset()  # (method, path) pairs answered

    def __init__(self) -> None:
        """Bind 127.0.0.1 on a free port and start serving."""
        self.requests: list[RecordedRequest] = []
        # ("received" | "answered", request) in the order they happened, across threads.
        self.events: list[tuple[str, RecordedRequest]] = []
        self.closing = threading.Event()
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._queue: deque[Reply] = deque()
        self._connections: set[socket.socket] = set()
        self._closed = False
        self.restore_defaults()
        super().__init__((LOOPBACK, 0), _RecordingHandler)
        self.port: int = self.server_address[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._serving = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._serving.start()

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address."""
        TCPServer.server_bind(self)
        self.server_name, self.server_port = LOOPBACK, self.server_address[1]

    # -- what tests use

    def enqueue(self, *replies: Reply) -> None:
        """Script the next replies, used first in, first out, one per answered request."""
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Forget requests and scripted replies, and restore the default behaviour."""
        with self._lock:
            self.requests.clear()
            self.events.clear()
            self._queue.clear()
            self.restore_defaults()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least n requests arrived; a copy of them, or TimeoutError."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.requests) >= n, timeout):
                raise TimeoutError(
                    f"{type(self).__name__} received {len(self.requests)} request(s), "
                    f"not {n}, within {timeout} s"
                )
            return list(self.requests)

    @property
    def pending_replies(self) -> int:
        """How many scripted replies are still unused."""
        with self._lock:
            return len(self._queue)

    def close(self) -> None:
        """Stop serving, release delayed replies and hang up every open connection."""
        if self._closed:
            return
        self._closed = True
        self.closing.set()
        self.shutdown()
        self.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # the client may have hung up already
                connection.shutdown(socket.SHUT_RDWR)
        self._serving.join(timeout=5)

    def note(self, event: str, request: RecordedRequest) -> None:
        """Add an event about this request to ``events``."""
        with self._lock:
            self.events.append((event, request))

    def order_of(self, *wanted: tuple[str, RecordedRequest]) -> list[tuple[str, RecordedRequest]]:
        """The wanted events in the order they happened (compared by identity)."""
        with self._lock:
            return [
                event
                for event in self.events
                if any(event[0] == name and event[1] is request for name, request in wanted)
            ]

    # -- what subclasses define

    def restore_defaults(self) -> None:
        """Reset the subclass's default behaviour; called on start and by reset()."""

    def default_reply(self, request: RecordedRequest) -> Reply:
        """The answer to a known route when no reply is scripted."""
        return Reply(200, {})

    # -- machinery

    def reply_to(self, request: RecordedRequest) -> Reply:
        """Record a request and choose its reply: 404/405 off routes, else scripted or default."""
        with self._arrived:
            self.requests.append(request)
            self.events.append(("received", request))
            self._arrived.notify_all()
        if (request.method, request.route) not in self.routes:
            if any(path == request.route for _, path in self.routes):
                return json_error(405, f"method {request.method} not allowed")
            return json_error(404, f"no route {request.method} {request.route}")
        with self._lock:
            scripted = self._queue.popleft() if self._queue else None
        return scripted if scripted is not None else self.default_reply(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Track the connection so close() can hang it up."""
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """Forget a finished connection."""
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hang up; report real handler bugs."""
        if self.closing.is_set() or isinstance(sys.exc_info()[1], _CONNECTION_ERRORS):
            return
        super().handle_error(request, client_address)


# ---------------------------------------------------------------- OpenAI Chat Completions


def _openai_error_type(status: int, code: str | None) -> str:
    """The `type` OpenAI gives an error of this status and code."""
    if status == 429:
        return "insufficient_quota" if code == "insufficient_quota" else "requests"
    return "server_error" if status >= 500 else "invalid_request_error"


# What OpenAI answers a reasoning model (gpt-5, o-series) about the fields it refuses.
MAX_TOKENS_UNSUPPORTED: dict[str, Any] = {
    "error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }
}
TEMPERATURE_UNSUPPORTED: dict[str, Any] = {
    "error": {
        "message": "Unsupported value: 'temperature' does not support 0 with this model. "
        "Only the default (1) value is supported.",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "unsupported_value",
    }
}
# The reasoning efforts OpenAI's GPT-5 models (gpt-5, gpt-5-mini, gpt-5-nano) and its GPT-6
# models take; a request that names no effort reasons at medium here, as both families reason by
# default.
GPT5_EFFORTS = frozenset({"minimal", "low", "medium", "high"})
GPT6_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})
DEFAULT_EFFORT = "medium"


def openai_error(
    status: int,
    message: str = "The server had an error while processing your request.",
    code: str | None = None,
    type_: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """An error in OpenAI's shape, as both its APIs send it; ``type_`` defaults to what OpenAI
    sends for that status and code."""
    kind = type_ or _openai_error_type(status, code)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Reply(status, body, headers=dict(headers or {}))


def effort_unsupported(effort: Any, efforts: frozenset[str]) -> Reply:
    """OpenAI's 400 for a reasoning effort the model does not take."""
    supported = ", ".join(f"'{name}'" for name in sorted(efforts))
    message = (
        f"Unsupported value: 'reasoning_effort' does not support {json.dumps(effort)} with this "
        f"model. Supported values are: {supported}."
    )
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": "reasoning_effort",
            "code": "unsupported_value",
        }
    }
    return Reply(400, body)


# The fields Mistral's chat completions endpoint knows; any other is a 422.
MISTRAL_FIELDS = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "top_p",
        "max_tokens",
        "stream",
        "stop",
        "random_seed",
        "response_format",
        "tools",
        "tool_choice",
        "presence_penalty",
        "frequency_penalty",
        "n",
        "prediction",
        "parallel_tool_calls",
        "safe_prompt",
    }
)


def mistral_extra_field(name: str, value: Any) -> Reply:
    """Mistral's 422 for a field it does not know."""
    detail = {
        "type": "extra_forbidden",
        "loc": ["body", name],
        "msg": "Extra inputs are not permitted",
        "input": value,
    }
    body = {
        "object": "error",
        "message": {"detail": [detail]},
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    return Reply(422, body)


class ChatCompletionsServer(RecordingServer):
    """An OpenAI-compatible Chat Completions endpoint that answers with `self.analysis`.

    By default it takes any field, as OpenAI does for gpt-4.1. `reasoning_tokens` makes it a
    reasoning model's server: it refuses `max_tokens`, a `reasoning_effort` outside `efforts`
    (GPT-5's by default, `GPT6_EFFORTS` for a GPT-6-style one) and a temperature other than 1
    unless the effort is `none`, and spends that many reasoning tokens (none at effort `none`)
    out of `max_completion_tokens` before the answer (an empty answer with `finish_reason:
    "length"` when they do not fit). `known_fields` makes it refuse, as Mistral does, every field
    outside the set with a 422. `GET /v1/models/{id}` answers `model_status`, with OpenAI's model
    object and `model_fields` (such as `shutdown_date`) when it is 200.
    """

    routes = frozenset({("POST", "/v1/chat/completions"), ("POST", "/chat/completions")})
    answer_tokens = 300  # what the visible answer costs out of the output cap

    def restore_defaults(self) -> None:
        """Answer with the sample salmon analysis again, taking any field."""
        self.analysis: dict[str, Any] = copy.deepcopy(DEFAULT_ANALYSIS)
        self.reasoning_tokens: int | None = None
        self.efforts = GPT5_EFFORTS
        self.known_fields: frozenset[str] | None = None
        self.model_status = 200
        self.model_fields: dict[str, Any] = {}
        # What GET /v1/models answers: None for a 404, else this listing with a 200.
        self.model_listing: dict[str, Any] | None = None
        self._probes: list[RecordedRequest] = []

    @property
    def base_url(self) -> str:
        """The value for OPENAI_BASE_URL."""
        return f"{self.url}/v1"

    @property
    def calls(self) -> list[RecordedRequest]:
        """The requests made to chat/completions."""
        with self._lock:
            return [r for r in self.requests if (r.method, r.route) in self.routes]

    @property
    def probes(self) -> list[RecordedRequest]:
        """The requests to GET /v1/models/{id} and GET /v1/models, kept apart from `requests`."""
        with self._lock:
            return list(self._probes)

    def reply_to(self, request: RecordedRequest) -> Reply:
        """Answer a model probe with `model_status`; anything else as a recording server does."""
        if request.method == "GET" and request.route == "/v1/models":
            with self._lock:
                self._probes.append(request)
                listing = copy.deepcopy(self.model_listing)
            return Reply(200, listing) if listing is not None else self.error(404, "Not Found")
        if not self._is_probe(request):
            return super().reply_to(request)
        with self._lock:
            self._probes.append(request)
        model_id = request.route.rsplit("/", 1)[-1]
        if self.model_status == 200:
            described = {"id": model_id, "object": "model", "created": 1790035200}
            return Reply(200, {**described, "owned_by": "openai", **self.model_fields})
        return self.error(self.model_status, f"The model '{model_id}' does not exist")

    @staticmethod
    def _is_probe(request: RecordedRequest) -> bool:
        return request.method == "GET" and request.route.startswith("/v1/models/")

    def default_reply(self, request: RecordedRequest) -> Reply:
        """A chat.completion whose content is `self.analysis` as JSON, for the requested model."""
        try:
            body = request.json()
            model = body.get("model", DEFAULT_MODEL)
        except (ValueError, AttributeError):
            return self.error(400, "We could not parse the JSON body of your request.")
        if self.known_fields is not None:
            unknown = [name for name in body if name not in self.known_fields]
            if unknown:
                return mistral_extra_field(unknown[0], body[unknown[0]])
        if self.reasoning_tokens is None:
            return self.completion(json.dumps(self.analysis), model=model)
        return self._reasoned_completion(body, model)

    def _reasoned_completion(self, body: dict[str, Any], model: str) -> Reply:
        """How a GPT-5- or GPT-6-style model answers: refusals, then reasoning out of the cap."""
        effort = body.get("reasoning_effort", DEFAULT_EFFORT)
        if "max_tokens" in body:
            return Reply(400, copy.deepcopy(MAX_TOKENS_UNSUPPORTED))
        if effort not in self.efforts and "reasoning_effort" in body:
            return effort_unsupported(effort, self.efforts)
        if body.get("temperature", 1) != 1 and effort != "none":
            return Reply(400, copy.deepcopy(TEMPERATURE_UNSUPPORTED))
        cap = body.get("max_completion_tokens")
        reasoning = 0 if effort == "none" else self.reasoning_tokens or 0
        needed = reasoning + self.answer_tokens
        if isinstance(cap, int) and cap < needed:
            spent = min(cap, reasoning)
            reply = self.completion("", model=model, finish_reason="length")
            usage = {"completion_tokens": cap, "reasoning_tokens": spent}
        else:
            reply = self.completion(json.dumps(self.analysis), model=model)
            usage = {"completion_tokens": needed, "reasoning_tokens": reasoning}
        assert isinstance(reply.body, dict)
        reply.body["usage"] = {
            "prompt_tokens": 900,
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": 900 + usage["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": usage["reasoning_tokens"],
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        return reply

    @staticmethod
    def completion(
        content: str | None,
        refusal: str | None = None,
        model: str = DEFAULT_MODEL,
        *,
        finish_reason: str = "stop",
    ) -> Reply:
        """A 200 chat.completion carrying this content and refusal."""
        return Reply(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": refusal},
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": {"prompt_tokens": 900, "completion_tokens": 80, "total_tokens": 980},
            },
            headers={"x-request-id": f"req_{uuid.uuid4().hex}"},
        )

    error = staticmethod(openai_error)

    def last_payload(self) -> dict[str, Any]:
        """The JSON body of the last chat/completions call."""
        calls = self.calls
        if not calls:
            raise AssertionError("the vision model was never called")
        payload: dict[str, Any] = calls[-1].json()
        return payload

    def last_image_bytes(self) -> bytes:
        """The JPEG bytes sent in the last call's data: URL."""
        url: str = self._last_image_url()["url"]
        prefix = "data:image/jpeg;base64,"
        if not url.startswith(prefix):
            raise AssertionError(f"the image is not a base64 JPEG data URL: {url[:48]!r}")
        return base64.b64decode(url[len(prefix) :], validate=True)

    def last_image_detail(self) -> str | None:
        """The image_url.detail of the last call, None when absent."""
        detail: str | None = self._last_image_url().get("detail")
        return detail

    def _last_image_url(self) -> dict[str, Any]:
        """The image_url object of the last call's user message."""
        for message in self.last_payload().get("messages", []):
            content = message.get("content")
            if message.get("role") == "user" and isinstance(content, list):
                for part in content:
                    if part.get("type") == "image_url":
                        image_url: dict[str, Any] = part["image_url"]
                        return image_url
        raise AssertionError("the last call has no image_url part in a user message")


# ---------------------------------------------------------------- OpenAI Responses API


class ResponsesServer(RecordingServer):
    """An OpenAI Responses endpoint (``POST /v1/responses``) that answers with `self.analysis`.

    Its answers have OpenAI's documented shape: a `reasoning` output item before the `message`
    whose `output_text` holds the analysis, and usage in `input_tokens` and `output_tokens`
    with their details. `refused_fields` makes it refuse those fields with OpenAI's 400 naming
    the field in `param`, as it does a `temperature` for a reasoning model.
    """

    routes = frozenset({("POST", "/v1/responses")})

    def restore_defaults(self) -> None:
        """Answer with the sample salmon analysis again, taking any field."""
        self.analysis: dict[str, Any] = copy.deepcopy(DEFAULT_ANALYSIS)
        self.refused_fields: frozenset[str] = frozenset()

    @property
    def base_url(self) -> str:
        """The value for OPENAI_BASE_URL."""
        return f"{self.url}/v1"

    @property
    def calls(self) -> list[RecordedRequest]:
        """The requests made to responses."""
        with self._lock:
            return [r for r in self.requests if (r.method, r.route) in self.routes]

    def default_reply(self, request: RecordedRequest) -> Reply:
        """A completed response whose text is `self.analysis` as JSON, or a refused field."""
        try:
            body = request.json()
            model = body.get("model", DEFAULT_MODEL)
        except (ValueError, AttributeError):
            return self.error(400, "We could not parse the JSON body of your request.")
        for name in sorted(self.refused_fields):
            if name in body:
                message = f"Unsupported parameter: '{name}' is not supported with this model."
                return self.error(400, message, code="unsupported_parameter", param=name)
        return self.response(json.dumps(self.analysis), model=model)

    @staticmethod
    def response(
        text: str | None,
        model: str = DEFAULT_MODEL,
        *,
        incomplete: str | None = None,
        refusal: str | None = None,
        reasoning_tokens: int = 0,
        cached_tokens: int = 0,
    ) -> Reply:
        """A 200 response: `status: incomplete` with `incomplete_details.reason` when given."""
        content: list[dict[str, Any]] = []
        if text is not None:
            content.append({"type": "output_text", "text": text, "annotations": []})
        if refusal is not None:
            content.append({"type": "refusal", "refusal": refusal})
        output_tokens = 80 + reasoning_tokens
        status = "incomplete" if incomplete else "completed"
        return Reply(
            200,
            {
                "id": f"resp_{uuid.uuid4().hex}",
                "object": "response",
                "created_at": int(time.time()),
                "status": status,
                "error": None,
                "incomplete_details": {"reason": incomplete} if incomplete else None,
                "model": model,
                "output": [
                    {"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "summary": []},
                    {
                        "id": f"msg_{uuid.uuid4().hex}",
                        "type": "message",
                        "status": status,
                        "role": "assistant",
                        "content": content,
                    },
                ],
                "store": False,
                "usage": {
                    "input_tokens": 900,
                    "input_tokens_details": {"cached_tokens": cached_tokens},
                    "output_tokens": output_tokens,
                    "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                    "total_tokens": 900 + output_tokens,
                },
            },
            headers={"x-request-id": f"req_{uuid.uuid4().hex}"},
        )

    error = staticmethod(openai_error)

    def last_payload(self) -> dict[str, Any]:
        """The JSON body of the last responses call."""
        calls = self.calls
        if not calls:
            raise AssertionError("the vision model was never called")
        payload: dict[str, Any] = calls[-1].json()
        return payload


# ---------------------------------------------------------------- User Service


def answer_with(**changes: Any) -> Reply:
    """A completion carrying the default analysis with some fields changed (None drops one)."""
    analysis = {**DEFAULT_ANALYSIS, **changes}
    return ChatCompletionsServer.completion(
        json.dumps({name: value for name, value in analysis.items() if value is not None})
    )


class UserServiceServer(RecordingServer):
    """A User Service that stores food entries in `self.entries` and answers 201 with an id."""

    routes = frozenset({("POST", "/food-entries"), ("GET", "/health")})

    def restore_defaults(self) -> None:
        """Forget the stored entries."""
        self.entries: list[dict[str, Any]] = []

    @property
    def calls(self) -> list[RecordedRequest]:
        """The requests made to POST /food-entries."""
        with self._lock:
            return [r for r in self.requests if r.route == "/food-entries"]

    def default_reply(self, request: RecordedRequest) -> Reply:
        """Health answers ok; an entry is stored (with its new id) and echoed with 201."""
        if request.route == "/health":
            return Reply(200, {"status": "ok"})
        try:
            entry = request.json()
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            return json_error(400, "the body must be a JSON object")
        stored = {"id": str(uuid.uuid4()), **{k: v for k, v in entry.items() if k != "id"}}
        with self._lock:
            self.entries.append(stored)
        return Reply(201, stored)


# ---------------------------------------------------------------- a port that never answers


class StalledServer(ClosesOnExit):
    """A TCP listener that accepts connections and never writes: a hung Redis or HTTP peer."""

    def __init__(self) -> None:
        """Listen on a free loopback port and accept in a daemon thread."""
        self.host = LOOPBACK
        self._listener = socket.create_server((LOOPBACK, 0), backlog=128)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._accepting = threading.Thread(
            target=self._accept_forever, name=f"StalledServer:{self.port}", daemon=True
        )
        self._accepting.start()

    @property
    def redis_url(self) -> str:
        """A REDIS_URL pointing here."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def http_url(self) -> str:
        """An http:// base URL pointing here."""
        return f"http://{self.host}:{self.port}"

    @property
    def accepted(self) -> int:
        """How many connections were accepted so far."""
        with self._lock:
            return len(self._connections)

    def _accept_forever(self) -> None:
        """Accept and keep every connection, reading and writing nothing."""
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            with self._lock:
                self._connections.append(connection)

    def close(self) -> None:
        """Stop listening and close every accepted connection."""
        self._stop.set()
        self._accepting.join(timeout=5)
        self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()


# ---------------------------------------------------------------- a real Redis


_running_redis: set[RedisServer] = set()  # strong refs: a dropped server is still stopped at exit
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform == "linux" else None


def die_with_parent() -> None:
    """In the child before exec: have Linux send SIGTERM when the forking thread ends."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@atexit.register
def _stop_forgotten_redis_servers() -> None:
    """Safety net only: fixtures must call stop() themselves."""
    for server in list(_running_redis):
        server.stop()


class PortInUseError(RuntimeError):
    """redis-server could not bind its port."""


class RedisServer(ClosesOnExit):
    """A throwaway `redis-server` on 127.0.0.1, no persistence, started by the constructor.

    Call stop() (fixtures do, in a finally or after yield); a server forgotten anyway is stopped
    at interpreter exit, and on Linux it gets SIGTERM if the thread that started it dies, so
    start it from the main thread. Each start() begins with an empty data set.
    """

    def __init__(
        self, password: str | None = None, *, port: int | None = None, startup_timeout: float = 10.0
    ) -> None:
        """Start redis-server on the given port, or on a free one (retrying if it gets taken)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not on PATH; the tests need a real Redis "
                "(e.g. `apt-get install redis-server`) and do not skip without it"
            )
        self._binary = binary
        self.host = LOOPBACK
        self.password = password
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._last_log = ""
        if port is not None:
            self.port = port
            self.start()
            return
        for attempt in range(3):
            self.port = free_port()
            try:
                self.start()
                return
            except PortInUseError:
                if attempt == 2:
                    raise

    @property
    def url(self) -> str:
        """A redis:// URL with the password URL-encoded, database 0."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def client(self, **options: Any) -> redis.Redis:
        """A new client (bytes responses, with the password); the caller closes it."""
        settings: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 5, **options}
        return redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            decode_responses=False,
            **settings,
        )

    def flush(self) -> None:
        """Delete every key in every database."""
        with self.client() as connection:
            connection.flushall()

    def log(self) -> str:
        """The server's log so far (of the last run once stopped)."""
        if self._dir is not None and (self._dir / "redis.log").exists():
            return (self._dir / "redis.log").read_text(errors="replace")
        return self._last_log

    def start(self) -> None:
        """Start the server on self.port (again), waiting until it answers PING."""
        if self.running:
            return
        self._dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        command = [
            self._binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            command += ["--requirepass", self.password]
        with open(self._dir / "redis.log", "wb") as log_file:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # only calls prctl: fork-safe
            )
        _running_redis.add(self)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        """Poll until our process answers, or stop it and raise with its log."""
        deadline = time.monotonic() + self.startup_timeout
        probe = self.client(
            socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        try:
            while True:
                exit_code = self._process.poll() if self._process else -1
                if exit_code is not None:
                    self.stop()
                    error = (
                        PortInUseError if "Address already in use" in self.log() else RuntimeError
                    )
                    raise error(f"redis-server exited with {exit_code}:\n{self.log()}")
                try:
                    # Another server may hold the port: only our process's answer counts.
                    if probe.info("server").get("process_id") == self._process_id():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    pass  # not up yet, or a stranger's server on the port (auth errors included)
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server did not answer PING within {self.startup_timeout} s:\n"
                        f"{self.log()}"
                    )
                time.sleep(0.02)
        finally:
            probe.close()

    def _process_id(self) -> int | None:
        """The pid of the running redis-server."""
        return self._process.pid if self._process is not None else None

    def close(self) -> None:
        """Stop the server (what a with block does on the way out)."""
        self.stop()

    def stop(self) -> None:
        """Terminate the server and wait for it; safe to call twice."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _running_redis.discard(self)
        if self._dir is not None:
            self._last_log = self.log()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
