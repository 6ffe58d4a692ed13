"""Gunicorn settings, read by `gunicorn app:app` from the working directory.

Every value can be overridden from the environment (or with `GUNICORN_CMD_ARGS` / the command
line). A request spends seconds waiting on the vision model, so each worker runs many threads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def env_int(name: str, default: int) -> int:
    """A whole number from the environment."""
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def env_float(name: str, default: float) -> float:
    """A number from the environment."""
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def worst_request_seconds() -> int:
    """The longest a request may legitimately take: every model attempt, the waits, the save."""
    attempts = env_int("OPENAI_MAX_ATTEMPTS", 3)
    per_attempt = env_float("OPENAI_API_TIMEOUT", 30)
    longest_wait = max(
        env_float("OPENAI_RETRY_MAX_WAIT", 8), env_float("OPENAI_RETRY_AFTER_CAP", 20)
    )
    user_service = env_float("USER_SERVICE_TIMEOUT", 10)
    return int(attempts * per_attempt + (attempts - 1) * longest_wait + user_service) + 1


bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8083")
worker_class = "gthread"
workers = env_int("GUNICORN_WORKERS", 2)
threads = env_int("GUNICORN_THREADS", 64)
timeout = env_int("GUNICORN_TIMEOUT", worst_request_seconds() + 30)
graceful_timeout = env_int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = env_int("GUNICORN_KEEPALIVE", 5)
max_requests = env_int("GUNICORN_MAX_REQUESTS", 10000)
max_requests_jitter = env_int("GUNICORN_MAX_REQUESTS_JITTER", 1000)
# The app is imported once, in the master, and workers are forked from it: a recycled worker
# starts in milliseconds instead of re-importing Pillow, cryptography and the rest (about a second
# of CPU each time), and the workers share those pages. Nothing connects at import, so no socket
# is shared across the fork.
preload_app = True
# Heartbeat files in memory: a worker never blocks on a slow disk to say it is alive.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108
# Header limits: a header line may reach 72 KiB, so an oversized bearer token still gets the
# service's own 401 JSON rather than gunicorn's HTML 400; fewer header lines than the default
# keep the total per request bounded.
limit_request_field_size = env_int("GUNICORN_LIMIT_REQUEST_FIELD_SIZE", 72 * 1024)
limit_request_fields = env_int("GUNICORN_LIMIT_REQUEST_FIELDS", 64)
# Gunicorn 25+ opens a control socket under $HOME by default; the image's user has no home and
# several instances on one host would share it, so it stays off.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%({x-request-id}o)s"'

# Workers write their metrics to files in one folder; /metrics sums them. prometheus_client
# chooses between in-process and per-file values when it is first imported, so the folder is
# set before anything imports it (nothing above does). A fresh folder per start keeps counts from
# an earlier run out; one made here is removed when gunicorn exits.
OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="image-service-metrics-")
else:
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live metrics so they are not summed forever."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    """Remove the metrics folder this configuration made."""
    if OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
