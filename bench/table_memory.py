"""Row i: what the USDA SR28 table costs each gunicorn worker, preloaded or loaded per worker.

Starts the real `gunicorn app:app` (2 workers, on the bench's stack) four ways: the app, and so
the table, preloaded in the master and forked to the workers (gunicorn.conf.py as is), or loaded
in each worker (`PER_WORKER_CONFIG`: gunicorn.conf.py with `preload_app = False`, its master
reading its settings with `NUTRITION_SOURCE=model`), each with the table
(`NUTRITION_SOURCE=usda-sr28`) and without it (`NUTRITION_SOURCE=model`). Every worker is driven
through `POST /nutrition` with the labelled descriptions of tests/nutrition_labels.py, so its
lazily built state (SQLite copies of the index, ranking profiles) is there, and then each
process's RSS and PSS are read from /proc/<pid>/smaps_rollup. The table's cost is the
difference with and without it, per worker and for the host (master and workers).

Start-up is timed the same four ways: from spawning `gunicorn app:app` to its first 200 on
/health/live, the kinds interleaved, the order alternating.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.stack import Stack, cpu_ticks, wait_until_idle
from tests.nutrition_labels import LABELLED_FOODS
from tests.servers import ROOT, Gunicorn

TARGET = "app:app"
WORKERS = 2
PRELOADED = "preloaded"
PER_WORKER = "per worker"
MODES = (PRELOADED, PER_WORKER)
TABLE = "usda-sr28"
MODEL = "model"
SOURCES = (TABLE, MODEL)
ITEMS_PER_REQUEST = 3
STARTUP_TIMEOUT = 30.0
POLL_INTERVAL = 0.01

# gunicorn.conf.py as shipped, but the app is built in each worker. Its master checks the
# settings with NUTRITION_SOURCE=model, so the table is loaded by the workers only; the
# variable is put back before the workers fork, and each worker reads it when it builds the app.
PER_WORKER_CONFIG = '''"""gunicorn.conf.py, with the app and its SR28 table built in each worker."""
import os

_source = os.environ.get("NUTRITION_SOURCE")
os.environ["NUTRITION_SOURCE"] = "model"
try:
    exec(compile(open({path!r}).read(), {path!r}, "exec"))
finally:
    if _source is None:
        del os.environ["NUTRITION_SOURCE"]
    else:
        os.environ["NUTRITION_SOURCE"] = _source
preload_app = False
'''


@dataclass(frozen=True)
class Memory:
    """Resident (RSS) and proportional (PSS) memory of one process, in kB."""

    rss_kb: int
    pss_kb: int
    pss_anon_kb: int


@dataclass(frozen=True)
class Footprint:
    """One gunicorn after its workers were driven: each process's memory and what it served."""

    mode: str
    source: str
    master: Memory
    workers: list[Memory]
    statuses: Counter[int]
    worker_cpu: list[float]  # seconds each worker spent while driven

    @property
    def worker_pss_kb(self) -> float:
        """The workers' mean PSS."""
        return statistics.mean(worker.pss_kb for worker in self.workers)

    @property
    def worker_rss_kb(self) -> float:
        """The workers' mean RSS."""
        return statistics.mean(worker.rss_kb for worker in self.workers)

    @property
    def host_pss_kb(self) -> int:
        """PSS of the master and every worker together: what the gunicorn costs the host."""
        return self.master.pss_kb + sum(worker.pss_kb for worker in self.workers)


def smaps_rollup(pid: int) -> Memory:
    """RSS, PSS and anonymous PSS of a process, from /proc/<pid>/smaps_rollup."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    return Memory(fields["Rss"], fields["Pss"], fields.get("Pss_Anon", 0))


def per_worker_config(folder: Path) -> Path:
    """Write the per-worker configuration into `folder`; its path."""
    path = folder / "gunicorn.per-worker.conf.py"
    path.write_text(PER_WORKER_CONFIG.format(path=str(ROOT / "gunicorn.conf.py")))
    return path


def overrides(mode: str, source: str, config: Path) -> dict[str, str | None]:
    """The environment of a gunicorn of this mode and source."""
    settings: dict[str, str | None] = {
        "NUTRITION_SOURCE": source,
        "GUNICORN_WORKERS": str(WORKERS),
    }
    if mode == PER_WORKER:
        settings["GUNICORN_CMD_ARGS"] = f"--config {config}"
    return settings


@contextlib.contextmanager
def running(stack: Stack, name: str, settings: dict[str, str | None]) -> Iterator[Gunicorn]:
    """A gunicorn of the stack, started here and stopped on leaving."""
    server = stack.start_gunicorn(name, TARGET, **settings)
    try:
        yield server
    finally:
        server.stop()
        stack.gunicorns.pop(name, None)


def nutrition_bodies(count: int) -> list[dict[str, object]]:
    """`count` POST /nutrition bodies, each naming the next labelled descriptions in turn."""
    names = itertools.cycle(label.description for label in LABELLED_FOODS)
    return [
        {"items": [{"name": next(names), "grams": 150} for _ in range(ITEMS_PER_REQUEST)]}
        for _ in range(count)
    ]


def drive(server: Gunicorn, token: str, count: int, clients: int) -> Counter[int]:
    """POST /nutrition `count` times from `clients` threads, a new connection each time.

    A connection per request lets both workers accept requests, as they would from many phones.
    """
    bodies = nutrition_bodies(count)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {token}"}

    def client(number: int) -> None:
        for body in bodies[number::clients]:
            answer = requests.post(
                f"{server.url}/nutrition", json=body, headers=headers, timeout=30
            )
            with lock:
                statuses[answer.status_code] += 1

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def footprint(
    stack: Stack, token: str, mode: str, source: str, config: Path, count: int, clients: int
) -> Footprint:
    """Start one gunicorn, drive its workers, read every process's memory, stop it."""
    name = f"i-{mode.replace(' ', '-')}-{source}"
    with running(stack, name, overrides(mode, source, config)) as server:
        stack.wait_until_ready(server)
        workers = server.worker_pids()
        before = {pid: cpu_ticks([pid]) for pid in workers}
        statuses = drive(server, token, count, clients)
        wait_until_idle(server, time.monotonic() + 10)
        if server.worker_pids() != workers:
            raise RuntimeError(f"gunicorn {name} replaced a worker while it was measured")
        ticks = os.sysconf("SC_CLK_TCK")
        return Footprint(
            mode=mode,
            source=source,
            master=smaps_rollup(server.process.pid),
            workers=[smaps_rollup(pid) for pid in workers],
            statuses=statuses,
            worker_cpu=[(cpu_ticks([pid]) - before[pid]) / ticks for pid in workers],
        )


def footprints(
    stack: Stack, token: str, folder: Path, count: int, clients: int
) -> dict[tuple[str, str], Footprint]:
    """Every mode with and without the table, one gunicorn at a time."""
    config = per_worker_config(folder)
    return {
        (mode, source): footprint(stack, token, mode, source, config, count, clients)
        for mode in MODES
        for source in SOURCES
    }


def time_to_live(stack: Stack, name: str, settings: dict[str, str | None]) -> float:
    """Seconds from spawning gunicorn to its first 200 on /health/live."""
    started = time.monotonic()
    with running(stack, name, settings) as server:
        deadline = started + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"gunicorn {name} exited:\n{server.log_tail()}")
            with contextlib.suppress(requests.ConnectionError, requests.Timeout):
                if requests.get(f"{server.url}/health/live", timeout=2).status_code == 200:
                    return time.monotonic() - started
            time.sleep(POLL_INTERVAL)
        raise RuntimeError(f"gunicorn {name} did not answer in time:\n{server.log_tail()}")


def start_times(stack: Stack, folder: Path, runs: int) -> dict[tuple[str, str], list[float]]:
    """Seconds to the first 200 for every mode and source, `runs` times each, interleaved.

    One untimed start first (files into the page cache); then each run starts every kind once,
    the order flipping every run, so drift on the machine hits all alike.
    """
    config = per_worker_config(folder)
    kinds = [(mode, source) for mode in MODES for source in SOURCES]
    time_to_live(stack, "i-start-warm-up", overrides(PRELOADED, TABLE, config))
    times: dict[tuple[str, str], list[float]] = {kind: [] for kind in kinds}
    for number in range(runs):
        for mode, source in kinds if number % 2 == 0 else list(reversed(kinds)):
            name = f"i-start-{number}-{mode.replace(' ', '-')}-{source}"
            times[mode, source].append(time_to_live(stack, name, overrides(mode, source, config)))
    return times
