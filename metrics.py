"""The service's Prometheus metrics, and their files when gunicorn runs several workers.

Each metric is declared once here; ``metrics_text`` renders them (summed over the workers'
files under ``PROMETHEUS_MULTIPROC_DIR``), and ``archive_dead_process_metrics`` folds a dead
worker's counts into one archive per kind so that recycling workers piles up no files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

# A dead worker's values that only ever add up; gauges keep prometheus_client's own handling.
ARCHIVED_METRIC_KINDS = ("counter", "histogram", "summary")
# Not a *.db file, so neither /metrics nor the start-up clean-up takes it for metrics.
METRICS_LOCK_FILE = "archive.lock"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
REQUESTS = Counter(
    "image_service_requests", "HTTP requests answered.", ["endpoint", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "image_service_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
CACHE_EVENTS = Counter(
    "image_service_cache_events", "Analysis cache lookups (hit, miss) and failures.", ["event"]
)
MODEL_REQUESTS = Counter(
    "image_service_model_requests", "Attempts to call the vision model, by outcome.", ["outcome"]
)
MODEL_SECONDS = Histogram(
    "image_service_model_request_duration_seconds",
    "Time of one attempt to call the vision model.",
    buckets=LATENCY_BUCKETS,
)
MODEL_TOKENS = Counter(
    "image_service_model_tokens", "Tokens the vision model reported using.", ["kind"]
)
SINGLE_FLIGHT = Counter(
    "image_service_single_flight",
    "Cache misses by role: leader (called the model), follower (waited), takeover.",
    ["role"],
)
# Every worker probes the same model; the fewest days a live worker counted is the one to alert on.
MODEL_SHUTDOWN_DAYS = Gauge(
    "image_service_model_shutdown_days",
    "Days until the vision model's announced shutdown date (negative once past).",
    ["model"],
    multiprocess_mode="livemin",
)
USER_SERVICE_REQUESTS = Counter(
    "image_service_user_service_requests", "Food entries sent to the User Service.", ["outcome"]
)


def metrics_text() -> bytes:
    """Every metric, summed over the worker processes when there are several."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        registry = prometheus_client.CollectorRegistry()
        MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
        with metrics_folder_lock(Path(folder), fcntl.LOCK_SH):
            return prometheus_client.generate_latest(registry)
    return prometheus_client.generate_latest()


@contextlib.contextmanager
def metrics_folder_lock(folder: Path, mode: int) -> Iterator[None]:
    """Hold the metrics folder's lock: shared to read it, exclusive to archive a dead worker."""
    with open(folder / METRICS_LOCK_FILE, "ab") as handle:
        fcntl.flock(handle, mode)
        yield


def archive_dead_process_metrics(pid: int, folder: Path) -> None:
    """Fold a dead worker's counts into one archive file per kind, so recycling piles up no files.

    ``mark_process_dead`` drops only its live gauges; its counters, histograms and summaries are
    added to ``<kind>_archive.db``, which /metrics sums like any worker's file, and removed.
    """
    mark_process_dead(pid, str(folder))  # type: ignore[no-untyped-call]
    with metrics_folder_lock(folder, fcntl.LOCK_EX):
        for kind in ARCHIVED_METRIC_KINDS:
            dead = folder / f"{kind}_{pid}.db"
            if dead.exists():
                add_into_archive(dead, folder / f"{kind}_archive.db")
                dead.unlink()


def add_into_archive(source: Path, archive: Path) -> None:
    """Add every value of one process's metrics file to the archive of its kind."""
    values = MmapedDict.read_all_values_from_file(str(source))  # type: ignore[no-untyped-call]
    archived = MmapedDict(str(archive))  # type: ignore[no-untyped-call]
    try:
        for key, value, _timestamp, _position in values:
            total = archived.read_value(key)[0] + value  # type: ignore[no-untyped-call]
            archived.write_value(key, total, 0.0)  # type: ignore[no-untyped-call]
    finally:
        archived.close()  # type: ignore[no-untyped-call]
