"""Gunicorn settings, read by `gunicorn app:app` from the working directory.

Every value can be overridden from the environment (or with `GUNICORN_CMD_ARGS` / the command
line). A request spends seconds waiting on the vision model, so each worker runs many threads.
The service's own settings are read here too, with `app.Config`: a bad value stops the start with
one message naming every bad variable, and the worker timeout follows from the same numbers the
service uses.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

# Workers write their metrics to files in one folder; /metrics sums them. prometheus_client
# chooses between in-process and per-file values when it is first imported, so the folder is
# set before anything imports it (app does). A fresh folder per start keeps counts from an
# earlier run out; one made here is removed when gunicorn exits.
OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="image-service-metrics-")
else:
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()

from gunicorn.workers.gthread import ThreadWorker  # noqa: E402

from app import (  # noqa: E402
    Config,
    nutrition_table,
    startup_summary,
)
from errors import ConfigError, ErrorCode  # noqa: E402
from metrics import archive_dead_process_metrics  # noqa: E402
from settings import EnvReader, Setting, listen_address, whole_number  # noqa: E402
from store import check_embedded_store  # noqa: E402

SERVER_SETTINGS: dict[str, tuple[Setting[Any], Any]] = {
    "bind": (Setting("GUNICORN_BIND", listen_address), "0.0.0.0:8083"),
    "workers": (Setting("GUNICORN_WORKERS", whole_number(low=1, high=256)), 2),
    "threads": (Setting("GUNICORN_THREADS", whole_number(low=1, high=10_000)), 64),
    "timeout": (Setting("GUNICORN_TIMEOUT", whole_number(low=1, high=86400)), None),
    "graceful_timeout": (Setting("GUNICORN_GRACEFUL_TIMEOUT", whole_number(low=0, high=3600)), 30),
    "keepalive": (Setting("GUNICORN_KEEPALIVE", whole_number(low=0, high=3600)), 5),
    "max_requests": (Setting("GUNICORN_MAX_REQUESTS", whole_number(low=0, high=10**9)), 10000),
    "max_requests_jitter": (
        Setting("GUNICORN_MAX_REQUESTS_JITTER", whole_number(low=0, high=10**9)),
        1000,
    ),
    # A header line may reach 72 KiB, so an oversized bearer token still gets the service's own
    # 401 JSON rather than gunicorn's HTML 400; fewer header lines than the default keep the
    # total per request bounded.
    "limit_request_field_size": (
        Setting("GUNICORN_LIMIT_REQUEST_FIELD_SIZE", whole_number(low=1024, high=1024 * 1024)),
        72 * 1024,
    ),
    "limit_request_fields": (
        Setting("GUNICORN_LIMIT_REQUEST_FIELDS", whole_number(low=1, high=32768)),
        64,
    ),
}
# Seconds past the worst legitimate request before gunicorn kills a silent worker.
TIMEOUT_MARGIN = 30


def read_settings() -> tuple[Config, dict[str, Any]]:
    """The service's Config and gunicorn's own settings, or one message and exit 1."""
    problems: list[str] = []
    reader = EnvReader(os.environ, problems)
    server = {
        name: reader.read(declared, default)
        for name, (declared, default) in SERVER_SETTINGS.items()
    }
    problems.extend(
        problem
        for name, (declared, _) in SERVER_SETTINGS.items()
        if (problem := declared.problem(server[name]))
    )
    try:
        config = Config.from_env()
        nutrition_table(config)  # loaded once, here in the master, before the workers fork
        if not config.redis_configured:
            check_embedded_store(config.store_file)  # opened and closed: each opens its own
    except ConfigError as error:
        problems[:0] = error.problems
    if problems:
        sys.exit("image-service: invalid configuration: " + "; ".join(problems))
    return config, server


CONFIG, SERVER = read_settings()

GUNICORN_ERRORS = {
    400: (ErrorCode.BAD_REQUEST, "the request is not valid HTTP"),
    414: (ErrorCode.URI_TOO_LONG, "the request line (method, path and query) is too long"),
    431: (
        ErrorCode.HEADER_TOO_LARGE,
        f"a request header is too large: at most {SERVER['limit_request_field_size']} bytes a "
        f"line and {SERVER['limit_request_fields']} lines",
    ),
}


class JsonErrorSocket:
    """A client's socket while gunicorn answers an error itself: the service's JSON, not HTML."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def sendall(self, data: bytes) -> None:
        """Send the JSON error for the status gunicorn's own page carries."""
        _, status, reason = data.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        code, message = GUNICORN_ERRORS.get(int(status), (ErrorCode.HTTP_ERROR, reason.lower()))
        body = json.dumps({"error": message, "code": str(code)}).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode("latin-1") + body)


class JsonErrorWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's threaded worker, answering the malformed requests it refuses in JSON."""

    def handle_request(self, req: Any, conn: Any) -> bool:
        """gunicorn's own, noting on the request that it has been answered."""
        keepalive: bool = super().handle_request(req, conn)
        req.answered = True
        return keepalive

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """gunicorn's own handling, written as the service's JSON error; one answer a request.

        A body the app left unread is drained after its answer; when that body cannot be parsed
        the connection closes, rather than send an answer nobody asked for.
        """
        if getattr(req, "answered", False):
            self.log.info(
                "Closing the connection after %s %s: its unread body could not be parsed (%s)",
                req.method,
                req.path,
                type(exc).__name__,
            )
            return
        super().handle_error(req, JsonErrorSocket(client), addr, exc)


bind = SERVER["bind"]
worker_class = JsonErrorWorker
workers = SERVER["workers"]
threads = SERVER["threads"]
timeout = SERVER["timeout"] or math.ceil(CONFIG.worst_request_seconds) + TIMEOUT_MARGIN
graceful_timeout = SERVER["graceful_timeout"]
keepalive = SERVER["keepalive"]
max_requests = SERVER["max_requests"]
max_requests_jitter = SERVER["max_requests_jitter"]
limit_request_field_size = SERVER["limit_request_field_size"]
limit_request_fields = SERVER["limit_request_fields"]
# The app is imported once, in the master, and workers are forked from it: a recycled worker
# starts in milliseconds instead of re-importing Pillow, cryptography and the rest (about a second
# of CPU each time), and the workers share those pages. Nothing connects at import, so no socket
# is shared across the fork.
preload_app = True
# Heartbeat files in memory: a worker never blocks on a slow disk to say it is alive.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
# Gunicorn 25+ opens a control socket under $HOME by default; the image's user has no home and
# several instances on one host would share it, so it stays off.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%({x-request-id}o)s"'


def when_ready(server: Any) -> None:
    """Say once, at start, what the service was configured with, and what is missing."""
    summary, *warnings = startup_summary(CONFIG)
    server.log.info("%s; %d workers x %d threads on %s", summary, workers, threads, bind)
    for warning in warnings:
        server.log.warning(warning)


def child_exit(server: Any, worker: Any) -> None:
    """Fold a dead worker's metrics into the archive, so recycled workers leave no files behind."""
    try:
        archive_dead_process_metrics(worker.pid, Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    except (OSError, RuntimeError, struct.error) as error:
        server.log.warning("The metrics of worker %s stay unarchived: %s", worker.pid, error)


def on_exit(server: Any) -> None:
    """Remove the metrics folder this configuration made."""
    if OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
