"""What the development stubs share: JSON answers, one log line a request, a clean stop.

Standard library only, beside the stubs that import it (`python tools/model_stub.py` puts this
folder on the import path, as does the compose stack's `python /tools/...`).
"""

from __future__ import annotations

import json
import signal
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any


class JsonHandler(BaseHTTPRequestHandler):
    """A keep-alive handler that answers JSON and logs to standard output."""

    protocol_version = "HTTP/1.1"

    def answer(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        """Send `payload` as JSON with `status`."""
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """One line per request on standard output (the base class writes to stderr)."""
        print(f"{self.address_string()} - {format % args}", flush=True)


def serve_until_stopped(server: ThreadingHTTPServer, name: str) -> int:
    """Serve until SIGTERM or Ctrl-C, saying so on standard output; 0 when stopped."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, so it must run on another thread.
        print(f"{name}: {signal.Signals(signum).name}, stopping", flush=True)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"{name}: listening on {host!s}:{port}", flush=True)
    with server:
        server.serve_forever()
    print(f"{name}: stopped", flush=True)
    return 0
