"""Prometheus multiprocess files: a dead worker's counts merged into one archive, totals kept."""

from __future__ import annotations

import re
from pathlib import Path

import requests
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from metrics import archive_dead_process_metrics
from tests.conftest import REQUEST_TIMEOUT, running_gunicorn
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer

REQUESTS_TOTAL = re.compile(r"^image_service_requests_total\{[^}]*\} (\S+)$", re.MULTILINE)
# The master's files, the live worker's, a replaced worker's not yet merged, and the archives.
MOST_FILES = 8


def write_values(path: Path, values: dict[tuple[str, str, tuple[str, ...]], float]) -> None:
    """A metrics file as prometheus_client writes it: (metric, sample, label values) -> value."""
    mapped = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    labelnames = {"counter": ["status"], "histogram": ["endpoint", "le"]}
    for (metric, sample, labels), value in values.items():
        kind = path.name.split("_")[0]
        names = labelnames[kind][: len(labels)]
        key = mmap_key(metric, sample, names, list(labels), f"{metric} help")
        mapped.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
    mapped.close()  # type: ignore[no-untyped-call]


def totals(folder: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample /metrics would show for the folder, by name and labels."""
    collector = MultiProcessCollector(None, path=str(folder))  # type: ignore[no-untyped-call]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in collector.collect()  # type: ignore[no-untyped-call]
        for sample in metric.samples
    }


def worker_files(folder: Path, pid: int) -> None:
    """A worker's counter and histogram files, as two requests of its would leave them."""
    write_values(
        folder / f"counter_{pid}.db",
        {
            ("requests", "requests_total", ("200",)): pid % 7 + 1,
            ("requests", "requests_total", ("404",)): 1,
        },
    )
    write_values(
        folder / f"histogram_{pid}.db",
        {
            ("seconds", "seconds_bucket", ("/a", "0.1")): 1,
            ("seconds", "seconds_bucket", ("/a", "+Inf")): 1,
            ("seconds", "seconds_sum", ("/a",)): 0.25 * pid,
        },
    )


def test_a_dead_workers_files_are_merged_into_the_archive_with_the_same_totals(
    tmp_path: Path,
) -> None:
    for pid in (101, 102, 103):
        worker_files(tmp_path, pid)
    MmapedDict(str(tmp_path / "gauge_livesum_101.db")).close()  # type: ignore[no-untyped-call]
    before = totals(tmp_path)

    archive_dead_process_metrics(101, tmp_path)
    archive_dead_process_metrics(102, tmp_path)

    assert totals(tmp_path) == before
    assert sorted(path.name for path in tmp_path.glob("*.db")) == [
        "counter_103.db",
        "counter_archive.db",
        "histogram_103.db",
        "histogram_archive.db",
    ]


def test_a_process_without_files_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    worker_files(tmp_path, 103)
    before = totals(tmp_path)

    archive_dead_process_metrics(999, tmp_path)

    assert totals(tmp_path) == before
    assert sorted(path.name for path in tmp_path.glob("*.db")) == [
        "counter_103.db",
        "histogram_103.db",
    ]


def requests_total(url: str) -> float:
    """The requests /metrics has counted, over every status and endpoint."""
    text = requests.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT).text
    return sum(float(value) for value in REQUESTS_TOTAL.findall(text))


def test_recycled_workers_leave_a_bounded_folder_and_the_same_totals(
    redis: RedisServer,
    model: ChatCompletionsServer,
    user_service: UserServiceServer,
    tmp_path: Path,
) -> None:
    made = 60
    with running_gunicorn(
        redis,
        model,
        user_service,
        tmp_path,
        GUNICORN_WORKERS="1",
        GUNICORN_MAX_REQUESTS="5",
        GUNICORN_MAX_REQUESTS_JITTER="0",
    ) as server:
        before = requests_total(server.url)
        for _ in range(made):
            answer = requests.get(
                f"{server.url}/health/live",
                headers={"Connection": "close"},
                timeout=REQUEST_TIMEOUT,
            )
            assert answer.status_code == 200
        after = requests_total(server.url)
        files = sorted(path.name for path in (tmp_path / "metrics").glob("*.db"))
        recycles = server.output().count("Autorestarting worker")

    assert recycles >= made // 10  # each worker served 5 requests, its last log line may lag
    assert after - before == made + 1  # the requests, and the /metrics read before them
    assert len(files) <= MOST_FILES, files
