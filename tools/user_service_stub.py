"""A development User Service: stores food entries in memory, standard library only.

    HOST=127.0.0.1 PORT=8082 python tools/user_service_stub.py    # make user-service

POST /food-entries (a JSON object with at least `userId` and `name`) answers 201 with the entry,
its new `id` and `createdAt`; GET /food-entries?userId=... lists a user's entries (all entries
without the parameter); GET /health answers 200. Not for production: nothing survives a restart.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from stub_http import JsonHandler, serve_until_stopped

MAX_BODY_BYTES = 1024 * 1024
REQUIRED_FIELDS = ("userId", "name")


class FoodEntryStore:
    """Food entries in memory, safe to use from the server's threads."""

    def __init__(self) -> None:
        self._entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Store a copy of the entry with a new id and creation time; return it."""
        entry = {
            **fields,
            "id": str(uuid.uuid4()),
            "createdAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        with self._lock:
            self._entries.append(entry)
        return entry

    def list(self, user_id: str | None) -> list[dict[str, Any]]:
        """The entries of one user (or all of them), oldest first."""
        with self._lock:
            return [e for e in self._entries if user_id is None or e.get("userId") == user_id]


class InvalidEntry(ValueError):
    """The request body is not a food entry; the message says why."""


def parse_entry(body: bytes) -> dict[str, Any]:
    """The entry in a request body: a JSON object whose `userId` and `name` are non-empty."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidEntry(f"the body is not JSON ({error})") from error
    if not isinstance(fields, dict):
        raise InvalidEntry("the body must be a JSON object")
    missing = [name for name in REQUIRED_FIELDS if fields.get(name) in (None, "")]
    if missing:
        raise InvalidEntry(f"missing field(s): {', '.join(missing)}")
    return fields


class UserServiceHandler(JsonHandler):
    """Routes the three endpoints; every answer is JSON."""

    server: UserServiceServer

    def do_GET(self) -> None:
        """GET /health and GET /food-entries."""
        url = urlsplit(self.path)
        if url.path == "/health":
            self.answer(HTTPStatus.OK, {"status": "healthy", "service": "user-service-stub"})
        elif url.path == "/food-entries":
            user_id = parse_qs(url.query).get("userId", [None])[0]
            self.answer(HTTPStatus.OK, {"entries": self.server.store.list(user_id)})
        else:
            self.answer(HTTPStatus.NOT_FOUND, {"error": f"no route for GET {url.path}"})

    def do_POST(self) -> None:
        """POST /food-entries."""
        url = urlsplit(self.path)
        if url.path != "/food-entries":
            self.answer(HTTPStatus.NOT_FOUND, {"error": f"no route for POST {url.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.answer(HTTPStatus.BAD_REQUEST, {"error": "a JSON body with Content-Length"})
            return
        try:
            fields = parse_entry(self.rfile.read(length))
        except InvalidEntry as error:
            self.answer(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        self.answer(HTTPStatus.CREATED, self.server.store.add(fields))


class UserServiceServer(ThreadingHTTPServer):
    """The HTTP server, holding the store its handlers share."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, UserServiceHandler)
        self.store = FoodEntryStore()


def main() -> int:
    """Serve on $HOST:$PORT (0.0.0.0:8082) until SIGTERM or Ctrl-C."""
    host = os.environ.get("HOST", "0.0.0.0")
    port = int(os.environ.get("PORT", "8082"))
    server = UserServiceServer((host, port))
    return serve_until_stopped(server, "user-service-stub")


if __name__ == "__main__":
    sys.exit(main())
