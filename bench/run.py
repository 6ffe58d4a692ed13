"""Benchmark the Image Service on the real stack and write its results (`bench/README.md`).

Starts a Redis of its own, a loopback Chat Completions server that answers after a delay, a
loopback User Service and Open Food Facts, and the real gunicorn (gunicorn.conf.py), generates
phone-like photos, and measures: a. image preparation, b. the cache-hit path, c. concurrent cache
misses, d. a burst of identical uploads over two instances, e. what is sent upstream, f. worker
memory, g. the embedded store (a duplicate burst over two workers, cache hits against Redis), h.
the USDA SR28 table (index build at start, matching per item), i. the table's memory per worker,
preloaded in the master against loaded in each worker, and the start-up it adds, j. several
photos of one meal in one request against one photo, k. the barcode scan's added time on a 12 MP
photo and codes turned 90 degrees, l. a photo of a known packaged product answered from Open Food
Facts without the model, against a photo the model analyses. Every figure stands beside a
baseline measured in the same run. Exits 0 whether or not the goals hold; non-zero only when the
harness itself fails.

    python bench/run.py [--quick] [--model-delay 1.5] [--only a,b,...] [--out RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from bench import nutrition as sr28  # noqa: E402
from bench import packaged, photo_sets, report, tokens  # noqa: E402
from bench import table_memory as table  # noqa: E402
from bench.load import LoadResult, Upload, burst, closed_loop, multipart_upload, percentile  # noqa: E402
from bench.photos import (  # noqa: E402
    DAYLIGHT,
    HIGH_ISO,
    THREE_MP,
    TWELVE_MP,
    PhotoLibrary,
    PhotoSpec,
    spec,
)
from bench.stack import PeakMemory, Stack, cpu_ticks, status_kb  # noqa: E402
from tests.servers import Gunicorn  # noqa: E402

ROWS = ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l")
MAIN_ROWS = frozenset("bcdef")  # the rows served by the `main` gunicorn
ANALYZE = "/analyze-food"
BARE = "/bench/bare-upload"
MAX_SIDE = 1024  # IMAGE_MAX_SIDE's default
OLD_CONFIG = {"GUNICORN_WORKERS": "1", "GUNICORN_THREADS": "2"}
DEFAULTS = "main, second, embedded (gunicorn.conf.py defaults)"
OLD = "old (c: GUNICORN_WORKERS=1 GUNICORN_THREADS=2)"
MAIN_TARGET = "bench.bare_app:application"
SERVICE_TARGET = "app:app"
EMBEDDED = "embedded"  # the gunicorn without Redis: the embedded store in the bench's folder
DUPLICATE_SEEDS = (4000, 4001)  # row g's new photos: one for the embedded store, one for Redis


Needed = TypeVar("Needed")


class HarnessTimeout(BaseException):
    """The whole run took longer than its limit (raised from SIGALRM)."""


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or a smoke run of a few seconds per row."""

    quick: bool
    model_delay: float
    rows: frozenset[str]
    out: Path
    prep_photos: int
    prep_rounds: int
    hit_photos: int
    hit_seconds: float
    hit_rounds: int
    miss_photos: int
    time_limit: int
    sr28_loads: int = 7
    sr28_rounds: int = 5
    table_requests: int = 300
    table_clients: int = 4
    table_starts: int = 5
    hit_clients: int = 16
    duplicate_uploads: int = 20
    set_requests: int = 10
    scan_photos: int = 6
    scan_rounds: int = 8
    product_requests: int = 10


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-delay", type=float, default=1.5, help="model answer delay, s")
    parser.add_argument("--quick", action="store_true", help="a smoke run of under 30 s")
    parser.add_argument("--out", type=Path, default=ROOT / ".local" / "bench" / "RESULTS.md")
    parser.add_argument("--only", default=",".join(ROWS), help="rows to run, e.g. a,b")
    args = parser.parse_args(argv)
    rows = frozenset(item.strip().lower() for item in args.only.split(",") if item.strip())
    unknown = rows - set(ROWS)
    if unknown or not rows:
        parser.error(f"--only takes a comma-separated subset of {','.join(ROWS)}")
    if not 0 <= args.model_delay <= 10:
        parser.error("--model-delay must be from 0 to 10 seconds")
    common = {"model_delay": args.model_delay, "rows": rows, "out": args.out.resolve()}
    if args.quick:
        return Settings(
            quick=True,
            prep_photos=2,
            prep_rounds=1,
            hit_photos=4,
            hit_seconds=1.5,
            hit_rounds=1,
            miss_photos=4,
            time_limit=150,
            sr28_loads=2,
            sr28_rounds=1,
            table_requests=60,
            table_starts=2,
            set_requests=2,
            scan_photos=2,
            scan_rounds=2,
            product_requests=2,
            **common,
        )
    return Settings(
        quick=False,
        prep_photos=8,
        prep_rounds=5,
        hit_photos=8,
        hit_seconds=5.0,
        hit_rounds=4,
        miss_photos=64,
        time_limit=600,
        **common,
    )


@dataclass
class Bench:
    """What the rows share: settings, photos, the running stack and the results so far."""

    settings: Settings
    library: PhotoLibrary
    rows: list[report.Row] = field(default_factory=list)
    stack: Stack | None = None
    main: Gunicorn | None = None
    second: Gunicorn | None = None
    old: Gunicorn | None = None
    embedded: Gunicorn | None = None
    token: str = ""
    memory: dict[str, PeakMemory] = field(default_factory=dict)
    idle_kb: int = 0
    failed: bool = False
    gunicorn_conf: dict[str, dict[str, object]] = field(default_factory=dict)
    goal_notes: list[str] = field(default_factory=list)
    workers_running: dict[str, int] = field(default_factory=dict)

    def run_row(self, label: str, measure: Callable[[], list[report.Row]]) -> None:
        """Measure one row; a failure becomes an error row and fails the harness."""
        print(f"[bench] {label} ...", flush=True)
        started = time.monotonic()
        try:
            rows = measure()
        except Exception as error:  # any failure is reported, then the next row
            self.failed = True
            rows = [report.failed_row(label, error)]
        for row in rows:
            self.rows.append(row)
            print(f"[bench]   {row.label}: {row.service} vs {row.baseline} -> {row.ratio}")
        print(f"[bench]   ({time.monotonic() - started:.1f} s)", flush=True)

    def keep_peak(self, name: str, memory: PeakMemory) -> None:
        """Remember the highest memory peak seen in phases of one kind."""
        kept = self.memory.get(name)
        if kept is None or memory.peak_kb > kept.peak_kb:
            self.memory[name] = memory

    @staticmethod
    def require(value: Needed | None) -> Needed:
        """A part of the stack a row needs, or a clear error when it was not started."""
        if value is None:
            raise RuntimeError("a part of the stack this row needs was not started")
        return value


# ------------------------------------------------------------------------- formatting


def ms(seconds: float) -> str:
    """Seconds as milliseconds."""
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def megabytes(size: int) -> str:
    """A byte count, readable."""
    return f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def sources(result: LoadResult) -> Counter[str]:
    """The ``source`` of every 200 answer (``cache``/``api``), else the status."""
    found: Counter[str] = Counter()
    for answer in result.answers:
        if answer.status != 200:
            found[f"HTTP {answer.status}"] += 1
            continue
        try:
            source = json.loads(answer.body).get("source")
        except (ValueError, AttributeError):
            source = "unreadable"
        found[str(source) if source else "HTTP 200"] += 1
    return found


def describe(counts: Counter[str]) -> str:
    """Counts as `name x count`, most common first."""
    return ", ".join(f"{name} x {count}" for name, count in counts.most_common()) or "none"


# ------------------------------------------------------------------------- a. preparation


def naive_prepare(data: bytes, max_side: int, quality: int) -> bytes:
    """What a first version does: decode it all, turn it upright, LANCZOS down, save."""
    opened = Image.open(io.BytesIO(data))
    opened.load()
    image = ImageOps.exif_transpose(opened).convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
    output = io.BytesIO()
    image.save(output, format="JPEG", quality=quality)
    return output.getvalue()


def decode_floor(data: bytes) -> object:
    """The least decoding Pillow can do for a JPEG: every coefficient read, scaled to 1/8."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()
    return image.size


PREP_SETS = (("high-ISO noise", HIGH_ISO), ("daylight noise", DAYLIGHT))
PREP_GOAL = 8.0


def prep_specs(settings: Settings) -> dict[str, list[PhotoSpec]]:
    """Row a's photo sets: the same scenes, seeds and orientations, differing only in noise."""
    seeds = range(1, settings.prep_photos + 1)
    return {name: [spec(TWELVE_MP, seed, noise) for seed in seeds] for name, noise in PREP_SETS}


def row_a(bench: Bench) -> list[report.Row]:
    """prepare_image against the naive way, interleaved on the same 12 MP photos, per noise set."""
    os.environ.setdefault("LOG_LEVEL", "ERROR")  # importing app builds an app; keep it quiet
    import app as service

    settings = bench.settings
    photo_sets = {name: bench.library.load(specs) for name, specs in prep_specs(settings).items()}
    config = service.Config()
    budget = service.DecodeBudget(config.decode_budget_mb, config.model_queue_timeout)
    quality = int(getattr(service, "JPEG_QUALITY", 85))
    calls: dict[str, Callable[[bytes], object]] = {
        "service": lambda photo: service.prepare_image(
            photo, MAX_SIDE, config.image_max_pixels, budget
        ),
        "naive": lambda photo: naive_prepare(photo, MAX_SIDE, quality),
        "floor": decode_floor,
    }
    for photos in photo_sets.values():  # one untimed warm-up call of each kind on each set
        for call in calls.values():
            call(photos[0])
    times: dict[str, dict[str, list[float]]] = {
        name: {kind: [] for kind in calls} for name in photo_sets
    }
    # Every round visits the photos in turn; for each, both noise sets and, within a set, the
    # service, the naive way and the floor, each order alternating, so drift hits all alike.
    for round_number in range(settings.prep_rounds):
        for index in range(settings.prep_photos):
            flip = (round_number + index) % 2 == 1
            names = list(reversed(photo_sets)) if flip else list(photo_sets)
            for name in names:
                photo = photo_sets[name][index]
                order = list(reversed(calls)) if flip else list(calls)
                for kind in order:
                    started = time.perf_counter()
                    calls[kind](photo)
                    times[name][kind].append(time.perf_counter() - started)
    rows = [
        prep_row(name, photo_sets[name], times[name], settings, service, quality)
        for name in photo_sets
    ]
    bench.goal_notes += prep_goal_notes(rows, photo_sets, times)
    return rows


def prep_row(
    name: str,
    photos: list[bytes],
    times: dict[str, list[float]],
    settings: Settings,
    service: ModuleType,
    quality: int,
) -> report.Row:
    """Row a for one photo set: medians, p95, output sizes and the decode floor."""
    fast, slow = percentile(times["service"], 0.5), percentile(times["naive"], 0.5)
    floor = percentile(times["floor"], 0.5)
    config = service.Config()
    budget = service.DecodeBudget(config.decode_budget_mb, config.model_queue_timeout)
    prepared = service.prepare_image(photos[0], MAX_SIDE, config.image_max_pixels, budget)
    naive = naive_prepare(photos[0], MAX_SIDE, quality)
    with Image.open(io.BytesIO(naive)) as naive_image:
        naive_size = naive_image.size
    ratio = slow / fast
    sizes = [len(photo) for photo in photos]
    noise = dict(PREP_SETS)[name]
    return report.Row(
        f"a. prepare a 12 MP JPEG ({name}, {mean_size(photos)})",
        f"{ms(fast)} (p95 {ms(percentile(times['service'], 0.95))})",
        f"{ms(slow)} (p95 {ms(percentile(times['naive'], 0.95))}) naive",
        f"{ratio:.1f}x faster",
        f"≥ {PREP_GOAL:g}x",
        ratio >= PREP_GOAL,
        [
            f"{len(photos)} photos ({megabytes(min(sizes))}-{megabytes(max(sizes))}), "
            f"{settings.prep_rounds} round(s), {len(times['service'])} calls of each kind; "
            f"noise {noise} (standard deviation {noise_sigma(noise):.1f} grey levels).",
            f"Output: service {prepared.width}x{prepared.height} "
            f"({megabytes(len(prepared.jpeg))}), naive {naive_size[0]}x{naive_size[1]} "
            f"({megabytes(len(naive))}), JPEG quality {quality}.",
            f"Decode floor: {ms(floor)}, so no Pillow-based preparation can beat the naive way "
            f"by more than about {slow / floor:.1f}x.",
        ],
    )


def mean_size(photos: list[bytes]) -> str:
    """The average file size of a photo set, readable."""
    return megabytes(round(sum(len(photo) for photo in photos) / len(photos)))


def noise_sigma(noise: int) -> float:
    """Standard deviation of the sum of two layers of `tests.images._photo`'s noise."""
    layer = [value * noise // 250 for value in range(256)]
    mean = sum(layer) / len(layer)
    return math.sqrt(2 * sum((value - mean) ** 2 for value in layer) / len(layer))


def prep_goal_notes(
    rows: list[report.Row],
    photo_sets: dict[str, list[bytes]],
    times: dict[str, dict[str, list[float]]],
) -> list[str]:
    """What the Goals section says about goal a: where it holds, and the decode floor."""
    lines = []
    for row, name in zip(rows, photo_sets, strict=True):
        slow = percentile(times[name]["naive"], 0.5)
        floor = percentile(times[name]["floor"], 0.5)
        reachable = "within" if slow / floor >= PREP_GOAL else "beyond"
        lines.append(
            f"Goal a on the {name} photos ({mean_size(photo_sets[name])} on average): "
            f"{'holds' if row.holds else 'does NOT hold'}, {row.ratio} "
            f"(service {ms(percentile(times[name]['service'], 0.5))}, naive {ms(slow)}). "
            f"Their decode floor is {ms(floor)}, so the best any Pillow-based preparation could "
            f"do is about {slow / floor:.1f}x, {reachable} reach of ≥ {PREP_GOAL:g}x."
        )
    return lines


# ------------------------------------------------------------------------- b. cache hits


@dataclass
class Phase:
    """One closed-loop phase of row b and what the processes spent on it."""

    kind: str  # "service" or "bare"
    result: LoadResult
    worker_cpu: float | None  # seconds; None when a worker was replaced during the phase
    client_cpu: float
    restarts: int


def run_phase(bench: Bench, kind: str, uploads: list[Upload]) -> Phase:
    """Closed-loop load on the service or the bare endpoint, with CPU and memory accounting."""
    main = bench.require(bench.main)
    memory = PeakMemory(main)
    phase = closed_phase(bench, main, kind, ANALYZE if kind == "service" else BARE, uploads, memory)
    bench.keep_peak(f"b-{kind}", memory)
    return phase


def closed_phase(
    bench: Bench,
    server: Gunicorn,
    kind: str,
    path: str,
    uploads: list[Upload],
    memory: PeakMemory | None = None,
) -> Phase:
    """One closed-loop phase on one gunicorn: the row's clients, the workers' and clients' CPU."""
    settings = bench.settings
    workers = server.worker_pids()
    ticks, harness = cpu_ticks(workers), time.process_time()
    with memory if memory is not None else contextlib.nullcontext():
        result = closed_loop(
            server.port,
            bench.token,
            [(path, upload) for upload in uploads],
            concurrency=settings.hit_clients,
            duration=settings.hit_seconds,
        )
    client_cpu = time.process_time() - harness
    restarts = len(set(server.worker_pids()) - set(workers))
    worker_cpu = (cpu_ticks(workers) - ticks) / os.sysconf("SC_CLK_TCK")
    return Phase(kind, result, None if restarts else worker_cpu, client_cpu, restarts)


def row_b(bench: Bench) -> list[report.Row]:
    """Closed-loop cache hits against the bare-upload ceiling on the same gunicorn."""
    settings, main = bench.settings, bench.require(bench.main)
    specs = [spec(THREE_MP, 1000 + number) for number in range(settings.hit_photos)]
    uploads = [multipart_upload(photo) for photo in bench.library.load(specs)]
    warm = burst([(main.port, ANALYZE, upload) for upload in uploads], bench.token, timeout=60)
    if warm.statuses() != Counter({200: len(uploads)}) or warm.errors:
        raise RuntimeError(f"warming the cache failed: {dict(warm.statuses())} {warm.errors[:3]}")
    phases = []
    for round_number in range(settings.hit_rounds):
        order = ["bare", "service"] if round_number % 2 == 0 else ["service", "bare"]
        phases += [run_phase(bench, kind, uploads) for kind in order]
    by_kind = {kind: [p for p in phases if p.kind == kind] for kind in ("service", "bare")}
    service = combine([p.result for p in by_kind["service"]])
    bare = combine([p.result for p in by_kind["bare"]])
    ratio = service["rps"] / bare["rps"]
    hits = Counter[str]()
    for phase in by_kind["service"]:
        hits.update(sources(phase.result))
    bare_answers = Counter[str]()
    for phase in by_kind["bare"]:
        bare_answers.update(sources(phase.result))
    return [
        report.Row(
            f"b. cache hit, {settings.hit_clients} clients, 3 MP",
            f"{service['rps']:.0f} req/s (p50 {ms(service['p50'])}, p99 {ms(service['p99'])})",
            f"{bare['rps']:.0f} req/s bare upload (p50 {ms(bare['p50'])}, p99 {ms(bare['p99'])})",
            f"{ratio:.0%} of ceiling",
            "≥ 80%",
            ratio >= 0.8 and set(hits) == {"cache"},
            [
                f"{len(uploads)} photos ({megabytes(min(u.photo_bytes for u in uploads))}-"
                f"{megabytes(max(u.photo_bytes for u in uploads))}), {settings.hit_seconds:g} s "
                f"per phase, {settings.hit_rounds} round(s).",
                f"Per phase, service then bare, req/s: {phase_rates(by_kind['service'])} and "
                f"{phase_rates(by_kind['bare'])}.",
                f"Service answers: {describe(hits)} ({service['reconnects']} resent after the "
                f"server closed a keep-alive connection, {service['errors']} client errors). "
                f"Bare answers: {describe(bare_answers)} ({bare['errors']} client errors).",
                f"CPU per request, {cpu_per_request(by_kind)}.",
                f"Workers replaced during the phases (gunicorn `max_requests` recycling, "
                f"{recycle_cost(bench)}): {sum(p.restarts for p in by_kind['service'])} in "
                f"service phases, {sum(p.restarts for p in by_kind['bare'])} in bare ones.",
            ],
        )
    ]


def recycle_cost(bench: Bench) -> str:
    """What replacing a worker costs under the configuration that ran."""
    if bench.gunicorn_conf.get(DEFAULTS, {}).get("preload_app"):
        return "preload_app: the new worker is forked from the master with the app imported"
    return "about 1 s of CPU each to import the app again"


def phase_rates(phases: list[Phase]) -> str:
    """Each phase's requests per second, a star marking a phase with a worker restart."""
    return ", ".join(
        f"{p.result.requests_per_second:.0f}{'*' if p.restarts else ''}" for p in phases
    )


def cpu_per_request(by_kind: dict[str, list[Phase]]) -> str:
    """Workers' and clients' CPU per answered request, for each kind of phase."""
    parts = []
    for kind, phases in by_kind.items():
        steady = [p for p in phases if p.worker_cpu is not None]
        answers = sum(len(p.result.answers) for p in steady)
        every = sum(len(p.result.answers) for p in phases)
        worker = sum(p.worker_cpu or 0.0 for p in steady) / answers if answers else math.nan
        client = sum(p.client_cpu for p in phases) / every if every else math.nan
        parts.append(f"{kind}: gunicorn workers {ms(worker)}, harness clients {ms(client)}")
    return (
        "; ".join(parts)
        + f" (workers counted over phases without a restart; {os.cpu_count()} cores)"
    )


def combine(results: list[LoadResult]) -> dict[str, float]:
    """Throughput and latency over several phases of the same kind."""
    latencies = [value for result in results for value in result.latencies]
    answers = sum(len(result.answers) for result in results)
    elapsed = sum(result.elapsed for result in results)
    return {
        "rps": answers / elapsed if elapsed else math.nan,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "answers": answers,
        "reconnects": sum(result.reconnects for result in results),
        "errors": sum(len(result.errors) for result in results),
    }


# ------------------------------------------------------------------------- c. cache misses


def row_c(bench: Bench) -> list[report.Row]:
    """Many different photos at once, against one model delay and the old configuration."""
    settings, stack = bench.settings, bench.require(bench.stack)
    main, old = bench.require(bench.main), bench.require(bench.old)
    model = bench.require(stack.model)
    count, delay = settings.miss_photos, settings.model_delay
    specs = [spec(THREE_MP, 2000 + number) for number in range(count)]
    uploads = [multipart_upload(photo) for photo in bench.library.load(specs)]

    stack.flush_redis()
    calls_before = len(model.calls)
    workers = main.worker_pids()
    ticks = {pid: cpu_ticks([pid]) for pid in workers}
    with PeakMemory(main) as memory:
        current = burst(
            [(main.port, ANALYZE, upload) for upload in uploads], bench.token, timeout=60
        )
    spent = [(cpu_ticks([pid]) - ticks[pid]) / os.sysconf("SC_CLK_TCK") for pid in workers]
    bench.keep_peak("c", memory)
    arrivals = [call.received_at - current.started_monotonic for call in model.calls[calls_before:]]

    stack.flush_redis()
    old_timeout = math.ceil(count / 2) * delay * 2 + 30
    previous = burst(
        [(old.port, ANALYZE, upload) for upload in uploads], bench.token, timeout=old_timeout
    )

    ok = current.statuses() == Counter({200: count}) and not current.errors
    old_ok = previous.statuses() == Counter({200: count}) and not previous.errors
    wall, old_wall = current.elapsed, previous.elapsed
    ideal_ratio, speedup = wall / delay if delay else math.nan, old_wall / wall
    notes = [
        f"Current configuration (gunicorn.conf.py defaults): answers {describe(sources(current))}"
        f"; latency p50 {ms(percentile(current.latencies, 0.5))}, max "
        f"{ms(max(current.latencies, default=math.nan))}.",
        f"The model received {len(arrivals)} calls; {concurrency_story(arrivals, delay)}.",
        f"The main gunicorn's {len(workers)} workers "
        f"({bench.gunicorn_conf.get(DEFAULTS, {}).get('threads')} threads each) used "
        f"{' + '.join(f'{seconds:.2f}' for seconds in spent)} s of CPU during the burst "
        f"({sum(spent) / count * 1000:.0f} ms per miss, on {os.cpu_count()} cores shared with "
        "the clients).",
        f"Old configuration: answers {describe(sources(previous))}, wall {previous.elapsed:.1f} s.",
    ]
    if current.errors or previous.errors:
        notes.append(f"Client errors: {(current.errors + previous.errors)[:3]}")
    return [
        report.Row(
            f"c. {count} misses at once vs ideal",
            f"{wall:.2f} s",
            f"{delay:g} s ideal (one model delay)",
            f"{ideal_ratio:.2f}x ideal",
            "≤ 1.5x",
            ok and ideal_ratio <= 1.5,
            notes,
        ),
        report.Row(
            f"c. {count} misses vs old config",
            f"{wall:.2f} s",
            f"{old_wall:.1f} s (1 worker x 2 threads)",
            f"{speedup:.1f}x faster",
            "≥ 10x",
            ok and old_ok and speedup >= 10,
        ),
    ]


def concurrency_story(arrivals: list[float], delay: float) -> str:
    """When the model calls arrived after the start, and how many at most were in flight."""
    if not arrivals:
        return "no calls arrived"
    ordered = sorted(arrivals)
    most = max(sum(1 for other in ordered if start <= other < start + delay) for start in ordered)
    late = sum(1 for arrival in ordered if arrival >= ordered[0] + delay)
    return (
        f"the first arrived {ordered[0]:.2f} s after the start, the last {ordered[-1]:.2f} s; "
        f"at most {most} were in flight at once, and {late} arrived more than one model delay "
        "after the first"
    )


# ------------------------------------------------------------------------- d. duplicates


def row_d(bench: Bench) -> list[report.Row]:
    """One new photo uploaded by many clients at once, split over two instances."""
    settings, stack = bench.settings, bench.require(bench.stack)
    main, second = bench.require(bench.main), bench.require(bench.second)
    model = bench.require(stack.model)
    upload = multipart_upload(bench.library.load([spec(THREE_MP, 3000)])[0])
    count = settings.duplicate_uploads
    targets = [((main if n % 2 == 0 else second).port, ANALYZE, upload) for n in range(count)]
    calls_before = len(model.calls)
    result = burst(targets, bench.token, timeout=60)
    time.sleep(0.3)  # a late call still counts
    calls = len(model.calls) - calls_before
    ok = result.statuses() == Counter({200: count}) and not result.errors
    p50 = percentile(result.latencies, 0.5)
    return [
        report.Row(
            f"d. {count} identical uploads, 2 instances",
            f"{calls} model call(s); p50 {ms(p50)}",
            f"{count} calls without coalescing; p50 ≥ {settings.model_delay:g} s (one delay)",
            f"{calls} call(s) per photo",
            "exactly 1",
            ok and calls == 1,
            [
                f"Latency over all {count} answers: p95 {ms(percentile(result.latencies, 0.95))}.",
                f"Answers: {describe(sources(result))}"
                + (f"; client errors {result.errors[:3]}" if result.errors else "."),
            ],
        )
    ]


# ------------------------------------------------------------------------- e. upstream cost


def patches(width: int, height: int, *, model: str) -> int:
    """Tokens under the patch formula for one model."""
    return tokens.patch_tokens(width, height, model)


def row_e(bench: Bench) -> list[report.Row]:
    """Bytes and image tokens of one 12 MP photo as the model receives it, against the upload."""
    stack, main = bench.require(bench.stack), bench.require(bench.main)
    model = bench.require(stack.model)
    photo = bench.library.load([spec(TWELVE_MP, 100)])[0]
    calls_before = len(model.calls)
    result = burst([(main.port, ANALYZE, multipart_upload(photo))], bench.token, timeout=60)
    if result.statuses() != Counter({200: 1}) or len(model.calls) != calls_before + 1:
        raise RuntimeError(f"the 12 MP upload was not analysed: {describe(sources(result))}")
    sent = model.last_image_bytes()
    with Image.open(io.BytesIO(photo)) as original:
        upright = ImageOps.exif_transpose(original).size
        stored = original.size
    with Image.open(io.BytesIO(sent)) as received:
        prepared = received.size
    ratio = len(photo) / len(sent)
    rows = [
        report.Row(
            "e. bytes upstream per 12 MP photo",
            f"{megabytes(len(sent))} ({prepared[0]}x{prepared[1]})",
            f"{megabytes(len(photo))} upload ({upright[0]}x{upright[1]})",
            f"{ratio:.0f}x fewer",
            "≥ 20x",
            ratio >= 20,
            [f"The upload is stored {stored[0]}x{stored[1]} with EXIF orientation 6."],
        )
    ]
    formulas: list[tuple[str, Callable[[int, int], int]]] = [
        ("tiles, detail high", lambda w, h: tokens.tile_tokens(w, h, "high")),
        ("tiles, detail low", lambda w, h: tokens.tile_tokens(w, h, "low")),
    ]
    for model_name in tokens.PATCH_MULTIPLIERS:
        formulas.append((f"patches, {model_name}", functools.partial(patches, model=model_name)))
    for name, formula in formulas:
        ours, theirs = formula(*prepared), formula(*upright)
        rows.append(
            report.Row(
                f"e. image tokens ({name})",
                f"{ours}",
                f"{theirs}",
                f"{theirs / ours:.2f}x fewer",
                "reported",
                None,
            )
        )
    return rows


# ------------------------------------------------------------------------- f. memory


def row_f(bench: Bench) -> list[report.Row]:
    """Peak resident memory of a worker during b and c, against the same workers idle or bare."""
    rows = []
    idle = bench.idle_kb
    reset_note = "VmHWM of the main gunicorn's workers, reset at the start of each phase"
    service_b = bench.memory.get("b-service")
    bare_b = bench.memory.get("b-bare")
    if service_b is not None and bare_b is not None:
        rows.append(
            report.Row(
                "f. peak worker RSS during b",
                megabytes(service_b.peak_kb * 1024),
                f"{megabytes(bare_b.peak_kb * 1024)} bare-upload phases",
                f"{service_b.peak_kb / bare_b.peak_kb:.2f}x",
                "reported",
                None,
                [
                    f"{reset_note}. Idle after start: {megabytes(idle * 1024)}.",
                ],
            )
        )
    during_c = bench.memory.get("c")
    if during_c is not None:
        rows.append(
            report.Row(
                "f. peak worker RSS during c",
                megabytes(during_c.peak_kb * 1024),
                f"{megabytes(idle * 1024)} idle after start",
                f"{during_c.peak_kb / idle:.2f}x" if idle else "—",
                "reported",
                None,
                [f"{reset_note}."],
            )
        )
    if not rows:
        raise RuntimeError("f is measured during b and c; run them too (--only b,c,f)")
    if not all(item.reset_ok for item in bench.memory.values()):
        rows[0].notes.append("clear_refs was refused: peaks may include earlier phases.")
    return rows


# ------------------------------------------------------------------------- g. embedded store


def store_in_use(server: Gunicorn) -> str:
    """What the gunicorn's /health says its store is (`checks.store`)."""
    answer = requests.get(f"{server.url}/health", timeout=10)
    return str(answer.json().get("checks", {}).get("store", "unknown"))


def duplicate_burst(
    bench: Bench, server: Gunicorn, upload: Upload
) -> tuple[LoadResult, int, list[float]]:
    """The same new photo from many clients at once to one gunicorn: answers, model calls, CPU.

    The CPU is each worker's during the burst, in seconds: a worker that served none of the
    uploads spends next to nothing.
    """
    model = bench.require(bench.require(bench.stack).model)
    workers = server.worker_pids()
    ticks = {pid: cpu_ticks([pid]) for pid in workers}
    calls_before = len(model.calls)
    targets = [(server.port, ANALYZE, upload)] * bench.settings.duplicate_uploads
    result = burst(targets, bench.token, timeout=60)
    time.sleep(0.3)  # a late call still counts
    spent = [(cpu_ticks([pid]) - ticks[pid]) / os.sysconf("SC_CLK_TCK") for pid in workers]
    return result, len(model.calls) - calls_before, spent


def row_g(bench: Bench) -> list[report.Row]:
    """The embedded store: a duplicate burst over two workers, then cache hits against Redis."""
    settings = bench.settings
    embedded, with_redis = bench.require(bench.embedded), bench.require(bench.second)
    servers = {"embedded": embedded, "Redis": with_redis}
    stores = {name: store_in_use(server) for name, server in servers.items()}
    if not stores["embedded"].startswith("embedded") or stores["Redis"] != "redis":
        raise RuntimeError(f"the gunicorns do not use the stores this row compares: {stores}")
    return [duplicate_row(bench, servers, stores), store_hit_row(bench, servers, settings)]


def duplicate_row(bench: Bench, servers: dict[str, Gunicorn], stores: dict[str, str]) -> report.Row:
    """20 identical uploads at once to one gunicorn of two workers, embedded store then Redis."""
    count = bench.settings.duplicate_uploads
    photos = bench.library.load([spec(THREE_MP, seed) for seed in DUPLICATE_SEEDS])
    bursts = {
        name: duplicate_burst(bench, server, multipart_upload(photo))
        for (name, server), photo in zip(servers.items(), photos, strict=True)
    }
    (result, calls, spent), (redis_result, redis_calls, redis_spent) = bursts.values()
    ok = result.statuses() == Counter({200: count}) and not result.errors
    p50, redis_p50 = percentile(result.latencies, 0.5), percentile(redis_result.latencies, 0.5)
    notes = [
        f"{count} client threads, connected first, POST the same new 2016x1512 photo at once to "
        f"one gunicorn (defaults: {len(spent)} workers) whose store is {stores['embedded']}; "
        f"then another new photo the same way to a gunicorn of {len(redis_spent)} workers on "
        "the bench's Redis. Model calls counted at the fake model, a late call included.",
        f"Embedded: answers {describe(sources(result))}; latency p95 "
        f"{ms(percentile(result.latencies, 0.95))}; the workers used "
        f"{' + '.join(f'{seconds:.2f}' for seconds in spent)} s of CPU during the burst"
        f"{' (both served uploads)' if len(spent) > 1 and min(spent) > 0.01 else ''}.",
        f"Redis: answers {describe(sources(redis_result))}; latency p95 "
        f"{ms(percentile(redis_result.latencies, 0.95))}; workers' CPU "
        f"{' + '.join(f'{seconds:.2f}' for seconds in redis_spent)} s.",
    ]
    if result.errors or redis_result.errors:
        notes.append(f"Client errors: {(result.errors + redis_result.errors)[:3]}")
    return report.Row(
        f"g. {count} identical uploads, 2 workers, embedded store",
        f"{calls} model call(s); p50 {ms(p50)}",
        f"{redis_calls} model call(s) with Redis, same burst; p50 {ms(redis_p50)}",
        f"{calls} call(s) per photo",
        "exactly 1",
        ok and calls == 1,
        notes,
    )


def store_hit_row(bench: Bench, servers: dict[str, Gunicorn], settings: Settings) -> report.Row:
    """Closed-loop cache hits on the embedded store's gunicorn against Redis's, alternating."""
    specs = [spec(THREE_MP, 1000 + number) for number in range(settings.hit_photos)]
    uploads = [multipart_upload(photo) for photo in bench.library.load(specs)]
    for name, server in servers.items():
        warm = burst(
            [(server.port, ANALYZE, upload) for upload in uploads], bench.token, timeout=60
        )
        if warm.statuses() != Counter({200: len(uploads)}) or warm.errors:
            raise RuntimeError(f"warming the {name} cache failed: {dict(warm.statuses())}")
    phases: list[Phase] = []
    names = list(servers)
    for round_number in range(settings.hit_rounds):
        order = names if round_number % 2 == 0 else list(reversed(names))
        phases += [closed_phase(bench, servers[name], name, ANALYZE, uploads) for name in order]
    by_kind = {name: [p for p in phases if p.kind == name] for name in names}
    figures = {name: combine([p.result for p in by_kind[name]]) for name in names}
    answers = {name: Counter[str]() for name in names}
    for phase in phases:
        answers[phase.kind].update(sources(phase.result))
    embedded, redis = figures["embedded"], figures["Redis"]
    all_hits = all(set(found) == {"cache"} for found in answers.values())
    return report.Row(
        f"g. cache hit, {settings.hit_clients} clients, 3 MP: embedded store vs Redis",
        f"{embedded['rps']:.0f} req/s embedded (p50 {ms(embedded['p50'])}, "
        f"p99 {ms(embedded['p99'])})",
        f"{redis['rps']:.0f} req/s Redis (p50 {ms(redis['p50'])}, p99 {ms(redis['p99'])})",
        f"{embedded['rps'] / redis['rps']:.0%} of Redis",
        "reported; every answer a hit",
        all_hits,
        [
            f"The same {len(uploads)} photos as b, in both caches first; {settings.hit_clients} "
            f"client threads for {settings.hit_seconds:g} s per phase, {settings.hit_rounds} "
            "round(s) of one phase on each gunicorn (app:app, gunicorn.conf.py defaults), the "
            "order alternating; only the store differs.",
            f"Per phase, embedded then Redis, req/s: {phase_rates(by_kind['embedded'])} and "
            f"{phase_rates(by_kind['Redis'])}.",
            f"Answers: embedded {describe(answers['embedded'])}, Redis "
            f"{describe(answers['Redis'])} ({embedded['reconnects'] + redis['reconnects']} "
            f"resent after a keep-alive close, {embedded['errors'] + redis['errors']} client "
            "errors).",
            f"CPU per request, {cpu_per_request(by_kind)}; the Redis server's own CPU is not "
            "counted.",
            f"Workers replaced during the phases: {sum(p.restarts for p in by_kind['embedded'])}"
            f" embedded, {sum(p.restarts for p in by_kind['Redis'])} Redis.",
        ],
    )


# ------------------------------------------------------------------------- h. SR28 table


SR28_LOAD_GOAL = 1.0  # seconds: the issue asks for well under a second


def row_h(bench: Bench) -> list[report.Row]:
    """The USDA SR28 table: index build in fresh processes, matching per item cold and warm."""
    settings = bench.settings
    figures = sr28.measure(None, settings.sr28_loads, settings.sr28_rounds)
    load, imports = statistics.median(figures.loads), statistics.median(figures.imports)
    cold, warm = figures.cold, figures.warm
    warm_median, cold_median = statistics.median(warm), statistics.median(cold)
    delay = settings.model_delay
    per_answer = 10 * warm_median
    share = f", {per_answer / delay:.1%} of one model delay ({delay:g} s)" if delay else ""
    return [
        report.Row(
            "h. SR28 load and index build at start (fresh process)",
            f"{sr28.ms(load)} (min {sr28.ms(min(figures.loads))}, "
            f"max {sr28.ms(max(figures.loads))})",
            f"{sr28.ms(imports)} `import app`, the same way",
            f"{load / imports:.2f}x the service's import",
            f"< {SR28_LOAD_GOAL:g} s",
            load < SR28_LOAD_GOAL,
            [
                f"`NutritionTable.load` of {figures.folder} ({figures.food_count} foods: the xz "
                "files read, checked against SHA256SUMS, unpacked in memory and parsed, FTS5 "
                "index built), as the service loads it, timed inside each of "
                f"{len(figures.loads)} fresh interpreters after one untimed one (imports not "
                "counted); interleaved with as many fresh `import app`, the order alternating.",
                "A start pays it once per process that loads the table (with preload_app, "
                "the master only).",
            ],
        ),
        report.Row(
            "h. match one item to SR28 (warm)",
            f"{sr28.ms(warm_median)} (p95 {sr28.ms(sr28.percentile(warm, 0.95))})",
            f"{sr28.ms(cold_median)} (p95 {sr28.ms(sr28.percentile(cold, 0.95))}) cold, "
            "first pass on a fresh table",
            f"{cold_median / warm_median:.1f}x faster warm",
            "reported",
            None,
            [
                f"`NutritionTable.match(description, method=...)` for the {figures.items} "
                "labelled descriptions of tests/nutrition_labels.py (worded as a vision model "
                f"words them), in the harness process: one pass on a freshly loaded table (cold: "
                f"ranking profiles worked out and the thread's SQLite copy opened on first use), "
                f"then {figures.rounds} warm round(s); medians and p95 over every call.",
                f"{figures.matched} of {figures.items} items matched above the threshold. An "
                f"answer of 10 items costs about {sr28.ms(per_answer)} warm{share}.",
            ],
        ),
    ]


# ------------------------------------------------------------------------- i. SR28 table per worker


TABLE_START_GOAL = 1.0  # seconds a process may spend on the table at start
MASTER_WITHOUT_TABLE_KB = 5 * 1024  # below this RSS difference, a master holds no table


def signed_mb(kb: float) -> str:
    """A difference in kB, as signed megabytes."""
    return f"{kb * 1024 / 1e6:+.1f} MB"


def mb(kb: float) -> str:
    """A size in kB, as megabytes."""
    return f"{kb * 1024 / 1e6:.1f} MB"


def row_i(bench: Bench) -> list[report.Row]:
    """The SR28 table's memory per worker, preloaded against per worker, and its start-up."""
    stack, settings = bench.require(bench.stack), bench.settings
    with tempfile.TemporaryDirectory(prefix="image-service-bench-table-") as folder:
        found = table.footprints(
            stack, bench.token, Path(folder), settings.table_requests, settings.table_clients
        )
        starts = table.start_times(stack, Path(folder), settings.table_starts)
    return [table_memory_row(found, settings), table_start_row(starts)]


def table_memory_row(
    found: dict[tuple[str, str], table.Footprint], settings: Settings
) -> report.Row:
    """Per-worker and host PSS and RSS with the table less without it, for each mode."""
    cost = {
        mode: {
            "pss": found[mode, table.TABLE].worker_pss_kb - found[mode, table.MODEL].worker_pss_kb,
            "rss": found[mode, table.TABLE].worker_rss_kb - found[mode, table.MODEL].worker_rss_kb,
            "host": found[mode, table.TABLE].host_pss_kb - found[mode, table.MODEL].host_pss_kb,
        }
        for mode in table.MODES
    }
    preloaded, per_worker = cost[table.PRELOADED], cost[table.PER_WORKER]
    saved = per_worker["host"] - preloaded["host"]
    holds = preloaded["host"] <= per_worker["host"]
    expected = {table.TABLE: 200, table.MODEL: 503}
    answered = all(
        set(figures.statuses) == {expected[source]} for (_, source), figures in found.items()
    )
    per_process = [
        f"{mode}, {source}: master PSS {mb(f.master.pss_kb)} (RSS {mb(f.master.rss_kb)}); "
        f"workers PSS {', '.join(mb(w.pss_kb) for w in f.workers)} "
        f"(RSS {', '.join(mb(w.rss_kb) for w in f.workers)}; anonymous PSS "
        f"{', '.join(mb(w.pss_anon_kb) for w in f.workers)}); host PSS {mb(f.host_pss_kb)}; "
        f"answers {describe(Counter({f'HTTP {k}': v for k, v in f.statuses.items()}))}; "
        f"workers' CPU while driven {' + '.join(f'{s:.2f}' for s in f.worker_cpu)} s."
        for (mode, source), f in found.items()
    ]
    master_table = (
        found[table.PER_WORKER, table.TABLE].master.rss_kb
        - found[table.PER_WORKER, table.MODEL].master.rss_kb
    )
    kept = (
        "Preloading (gunicorn.conf.py as shipped, preload_app = True) costs the host less: it "
        "stays."
        if holds
        else "Loading in each worker costs the host less than preloading."
    )
    return report.Row(
        "i. SR28 table memory per worker, preloaded vs per worker",
        f"{signed_mb(preloaded['pss'])} PSS ({signed_mb(preloaded['rss'])} RSS) per worker, "
        "preloaded",
        f"{signed_mb(per_worker['pss'])} PSS ({signed_mb(per_worker['rss'])} RSS) per worker, "
        "loaded in each",
        f"host {signed_mb(preloaded['host'])} vs {signed_mb(per_worker['host'])} PSS: "
        + (f"preloading saves {mb(saved)}" if holds else f"per worker saves {mb(-saved)}"),
        "keep the mode with less host PSS",
        holds and answered,
        [
            f"`gunicorn app:app` with {table.WORKERS} workers on the bench's stack, four ways, "
            "one at a time: preloaded (gunicorn.conf.py as is: the app and the table built in "
            "the master, forked to the workers) or loaded in each worker (a temporary "
            "configuration that runs gunicorn.conf.py, then sets preload_app = False; its "
            "master reads its settings with NUTRITION_SOURCE=model, so only the workers load "
            "the table), each with NUTRITION_SOURCE=usda-sr28 and =model.",
            f"After start, {settings.table_requests} POST /nutrition of {table.ITEMS_PER_REQUEST} "
            "labelled descriptions each (tests/nutrition_labels.py), from "
            f"{settings.table_clients} client threads, a new connection each, so both workers "
            "build their lazy state (SQLite copies of the index, ranking profiles); with the "
            "table off they answer 503. Then, once the workers are idle, RSS and PSS from "
            "/proc/<pid>/smaps_rollup.",
            "The table's cost is the same figure with the table less without it: per worker "
            "the workers' mean, per host the master's PSS plus every worker's.",
            *per_process,
            f"Loaded in each worker, the master's RSS with the table less without it is "
            f"{signed_mb(master_table)}: "
            + (
                "the master does not hold the table."
                if abs(master_table) < MASTER_WITHOUT_TABLE_KB
                else "the master holds (part of) the table too, counted in the host's figure."
            ),
            f"{kept} Preloaded, a worker's pages of the table stay shared with the master until "
            "written; loaded in each worker, every worker holds a whole copy, and a worker "
            "replaced by max_requests builds it again.",
        ],
    )


def table_start_row(starts: dict[tuple[str, str], list[float]]) -> report.Row:
    """From spawning gunicorn to its first 200, with the table against without it."""
    median = {kind: statistics.median(times) for kind, times in starts.items()}
    with_table = median[table.PRELOADED, table.TABLE]
    without = median[table.PRELOADED, table.MODEL]
    added = with_table - without
    per_worker = median[table.PER_WORKER, table.TABLE] - median[table.PER_WORKER, table.MODEL]
    runs = len(starts[table.PRELOADED, table.TABLE])
    spread = "; ".join(
        f"{mode}, {source}: median {ms(median[mode, source])} "
        f"(min {ms(min(times))}, max {ms(max(times))})"
        for (mode, source), times in starts.items()
    )
    return report.Row(
        "i. start-up with the table",
        f"{ms(with_table)} to the first 200, preloaded (as shipped)",
        f"{ms(without)} with NUTRITION_SOURCE=model",
        f"{added * 1000:+.0f} ms for the table",
        f"≤ {TABLE_START_GOAL:g} s per process",
        added <= TABLE_START_GOAL,
        [
            f"From spawning `gunicorn app:app` ({table.WORKERS} workers, the bench's stack) to "
            f"its first 200 on /health/live, polled every {table.POLL_INTERVAL * 1000:g} ms; "
            f"{runs} run(s) of each kind after one untimed start, the kinds interleaved and the "
            "order alternating. The table's part is the difference of the medians.",
            spread + ".",
            f"Preloaded, the master alone loads the table, once per start; loaded in each "
            f"worker the table adds {per_worker * 1000:+.0f} ms (the workers load their copies "
            "at the same time, on the same cores), and again for every worker max_requests "
            "replaces. Row h times `NutritionTable.load` alone.",
        ],
    )


# ------------------------------------------------------------------------- j. photos of one meal


SET_GOAL = 2.0  # a three-photo request's service-side time, at most this many one-photo ones


def row_j(bench: Bench) -> list[report.Row]:
    """Three 12 MP photos in one request against one, on the real gunicorn; their preparation
    at once against one after another; the image tokens of a set."""
    settings, stack = bench.settings, bench.require(bench.stack)
    server, model = bench.require(bench.second), bench.require(stack.model)
    plan = photo_sets.Plan(settings.set_requests)
    one = bench.library.load(plan.one_photo(0))[0]
    steps = photo_sets.ServiceSteps(one, bench.library.load(plan.photo_set(0)))
    stack.flush_redis()
    sent = photo_sets.send_requests(
        server, model, bench.token, bench.library, plan, steps.run_round
    )
    prepared = steps.result()
    return [
        set_latency_row(sent, prepared, settings),
        upload_row(sent),
        preparation_row(prepared),
        *set_token_rows(sent),
    ]


def service_side(sent: list[photo_sets.Sent], delay: float) -> list[float]:
    """Each request's latency less the model's delay."""
    return [item.seconds - delay for item in sent]


def answered_as_expected(item: photo_sets.Sent) -> bool:
    """A fresh 200 from one model call that got every photo, with the right photoCount."""
    return (
        item.status == 200
        and item.source == "api"
        and item.photo_count == item.photos
        and item.model_calls == 1
        and len(item.received) == item.photos
    )


def median_of(wall: dict[str, list[float]], name: str) -> float:
    """The median of one kind of in-process call."""
    return statistics.median(wall[name])


def service_steps(wall: dict[str, list[float]], to_model: dict[str, float]) -> str:
    """The in-process medians of multipart parsing, hashing and preparation, for one and three
    photos, and what is left of the time to the model call."""
    parts = {
        "one photo": (photo_sets.PARSE_ONE, photo_sets.HASH_ONE, photo_sets.SINGLE),
        f"{photo_sets.SET_SIZE} photos": (
            photo_sets.PARSE_THREE,
            photo_sets.HASH_THREE,
            photo_sets.PARALLEL,
        ),
    }
    lines = []
    for (kind, (parse, digest, prepare)), arrival in zip(
        parts.items(), to_model.values(), strict=True
    ):
        steps = [median_of(wall, name) for name in (parse, digest, prepare)]
        lines.append(
            f"{kind}: multipart {ms(steps[0])}, hashing {ms(steps[1])}, preparation "
            f"{ms(steps[2])}, the rest of the time to the model call {ms(arrival - sum(steps))}"
        )
    return "; ".join(lines)


def set_latency_row(
    sent: photo_sets.Requests, prepared: photo_sets.Preparation, settings: Settings
) -> report.Row:
    """Service-side time of a three-photo request against a one-photo one, each a cache miss."""
    delay = settings.model_delay
    one, three = service_side(sent.one, delay), service_side(sent.three, delay)
    one_p50, three_p50 = statistics.median(one), statistics.median(three)
    ratio = three_p50 / one_p50
    every = [*sent.one, *sent.three, sent.largest]
    ok = all(answered_as_expected(item) for item in every)
    outcomes = Counter(
        f"HTTP {item.status} {item.source}, photoCount {item.photo_count}, "
        f"{len(item.received)} image part(s) in {item.model_calls} model call(s)"
        for item in every
    )
    to_model = {
        kind: statistics.median([item.to_model for item in items])
        for kind, items in (("one", sent.one), ("three", sent.three))
    }
    after = {
        kind: statistics.median([item.seconds - delay - item.to_model for item in items])
        for kind, items in (("one", sent.one), ("three", sent.three))
    }
    split = service_steps(prepared.wall, to_model)
    cpu = {
        kind: sum(item.worker_cpu for item in items) / len(items)
        for kind, items in (("one", sent.one), ("three", sent.three))
    }
    busy = {
        kind: cpu[kind] / statistics.mean(service_side(items, delay))
        for kind, items in (("one", sent.one), ("three", sent.three))
    }
    return report.Row(
        f"j. {photo_sets.SET_SIZE} photos vs 1 per request, 12 MP, service-side (miss)",
        f"{ms(three_p50)} per {photo_sets.SET_SIZE}-photo request (p50)",
        f"{ms(one_p50)} per 1-photo request (p50)",
        f"{ratio:.2f}x one photo's",
        f"≤ {SET_GOAL:g}x",
        ok and ratio <= SET_GOAL,
        [
            f"`gunicorn app:app` (gunicorn.conf.py defaults, the bench's Redis, flushed first); "
            f"one client, one keep-alive connection, one request at a time: after one untimed "
            f"request of each kind, {len(sent.one)} requests of one photo and {len(sent.three)} "
            f"of {photo_sets.SET_SIZE} photos, interleaved (the order alternating), every "
            "photo a new, distinct 4032x3024 JPEG (daylight noise, EXIF orientation and GPS), "
            "so every request is a cache miss with one model call. Service-side time = "
            f"latency (request sent to answer read) less the model's {delay:g} s delay.",
            f"Service-side per request, one photo: {', '.join(ms(v) for v in one)}; "
            f"{photo_sets.SET_SIZE} photos: {', '.join(ms(v) for v in three)}. Latency p50 "
            f"{ms(statistics.median(i.seconds for i in sent.one))} and "
            f"{ms(statistics.median(i.seconds for i in sent.three))}.",
            f"From sending the request to the model call's arrival at the fake model (p50): one "
            f"photo {ms(to_model['one'])}, {photo_sets.SET_SIZE} photos {ms(to_model['three'])}; "
            f"after the model's delay to the answer read: {ms(after['one'])} and "
            f"{ms(after['three'])}.",
            f"The workers' CPU per request (from /proc/<pid>/stat in 10 ms ticks, the mean over "
            f"the requests of each kind): one photo {ms(cpu['one'])}, {photo_sets.SET_SIZE} "
            f"photos {ms(cpu['three'])} ({cpu['three'] / cpu['one']:.2f}x); over the mean "
            f"service-side time that is {busy['one']:.2f} and {busy['three']:.2f} cores busy, "
            f"of {os.cpu_count()} (load average at the end {report.load_average()}).",
            "The service's steps timed in the harness process on the first request's photos, "
            f"a round after each pair of requests (p50 over {len(prepared.wall[photo_sets.SINGLE])}"
            " rounds; the multipart body read by `app.read_uploads` in a test request context, "
            "hashing by `app.distinct_photos`, preparation by `app.prepare_photos`): "
            f"{split} (upload over loopback, token, cache lookup, single flight, the model "
            "request's encoding).",
            f"Answers: {describe(outcomes)}; the five-photo request's latency "
            f"{ms(sent.largest.seconds)} (service-side {ms(sent.largest.seconds - delay)}).",
        ],
    )


def upload_row(sent: photo_sets.Requests) -> report.Row:
    """The multipart body of a request with one, three and five photos."""
    one = statistics.median(item.upload_bytes for item in sent.one)
    three = statistics.median(item.upload_bytes for item in sent.three)
    upstream = {
        len(item.received): sum(size for _, _, size in item.received)
        for item in (sent.one[0], sent.three[0], sent.largest)
    }
    return report.Row(
        "j. bytes uploaded per request, 12 MP daylight photos",
        f"{megabytes(round(three))} ({photo_sets.SET_SIZE} photos, p50)",
        f"{megabytes(round(one))} (1 photo, p50)",
        f"{three / one:.2f}x",
        "reported",
        None,
        [
            "The whole multipart/form-data body, one `image` file part per photo. The "
            f"five-photo request sent {megabytes(sent.largest.upload_bytes)} (MAX_UPLOAD_MB "
            "is 25).",
            "The model received "
            + ", ".join(f"{megabytes(size)} of JPEG for {n}" for n, size in upstream.items())
            + " photo(s) (before base64).",
        ],
    )


def preparation_row(prepared: photo_sets.Preparation) -> report.Row:
    """prepare_photos on three 12 MP photos (a thread pool, as shipped) against one by one."""
    parallel = median_of(prepared.wall, photo_sets.PARALLEL)
    serial = median_of(prepared.wall, photo_sets.SERIAL)
    single = median_of(prepared.wall, photo_sets.SINGLE)
    busy = {
        name: statistics.median(prepared.cpu[name]) / median_of(prepared.wall, name)
        for name in (photo_sets.PARALLEL, photo_sets.SERIAL)
    }
    sizes = ", ".join(f"{w}x{h} ({megabytes(size)})" for w, h, size in prepared.prepared)
    return report.Row(
        f"j. prepare {photo_sets.SET_SIZE} photos of 12 MP at once",
        f"{ms(parallel)} `prepare_photos` (p95 "
        f"{ms(percentile(prepared.wall[photo_sets.PARALLEL], 0.95))})",
        f"{ms(serial)} `prepare_image` x {photo_sets.SET_SIZE} in turn (p95 "
        f"{ms(percentile(prepared.wall[photo_sets.SERIAL], 0.95))})",
        f"{serial / parallel:.2f}x faster",
        "reported",
        None,
        [
            f"In the harness process, on the {photo_sets.SET_SIZE} photos of the first "
            f"{photo_sets.SET_SIZE}-photo request: `app.prepare_photos` (a thread pool of one "
            "thread per photo, as the service runs it) against `app.prepare_image` on each "
            "photo one after another, with the service's Config and DecodeBudget; a round "
            "after each pair of row j's requests (one untimed call of each first), with the "
            "other in-process steps, the order alternating; "
            f"{len(prepared.wall[photo_sets.PARALLEL])} rounds, medians.",
            f"One photo alone: {ms(single)}. Cores kept busy (process CPU over wall time, p50): "
            f"{busy[photo_sets.PARALLEL]:.2f} at once, {busy[photo_sets.SERIAL]:.2f} in turn, "
            f"of {os.cpu_count()} cores; load average at the end {report.load_average()} (other "
            "work on the machine takes cores the threads would use).",
            f"The JPEGs made: {sizes}.",
        ],
    )


def set_token_rows(sent: photo_sets.Requests) -> list[report.Row]:
    """Image tokens of a 1-, 3- and 5-photo request, from the JPEGs the model received."""
    requests = (sent.one[0], sent.three[0], sent.largest)
    formulas: list[tuple[str, Callable[[int, int], int]]] = [
        ("tiles, detail high", lambda w, h: tokens.tile_tokens(w, h, "high")),
        ("patches, gpt-4.1-mini", functools.partial(patches, model="gpt-4.1-mini")),
    ]
    sizes = "; ".join(
        f"{len(item.received)} photo(s): " + ", ".join(f"{w}x{h}" for w, h, _ in item.received)
        for item in requests
    )
    rows = []
    for name, formula in formulas:
        counts = [sum(formula(w, h) for w, h, _ in item.received) for item in requests]
        single = counts[0]
        photos = [len(item.received) for item in requests]
        rows.append(
            report.Row(
                f"j. image tokens per request, 1 / 3 / 5 photos ({name})",
                " / ".join(str(count) for count in counts),
                f"{single} for one photo; n x {single} = "
                + " / ".join(str(n * single) for n in photos),
                " / ".join(f"{count / single:.2f}x" for count in counts) + " one photo's",
                "reported",
                None,
                [
                    "OpenAI's published formula (bench/tokens.py) summed over the image parts "
                    "the fake model received in the first one-photo, the first "
                    f"{photo_sets.SET_SIZE}-photo and the five-photo request (IMAGE_MAX_SIDE "
                    f"{MAX_SIDE}); each photo is its own image part at its prepared size: "
                    f"{sizes}. Tokens grow in proportion to the photos.",
                ],
            )
        )
    return rows


# ------------------------------------------------------------------------- k. barcode scan


SCAN_GOAL_MS = 10.0  # the scan's median on a 12 MP photo, at most this many milliseconds
SCAN_SHARE_GOAL = 0.25  # and at most this share of the photo's whole preparation
SCAN_SEEDS = range(5000, 5100)  # row k's meal photos, none with a code
# Row k's turned codes: (format, content, angle), each on its own 12 MP package photo.
TURNED_CODES = (
    ("EAN13", "3017620422003", 93.0),
    ("EAN13", "3017620422003", -87.0),
    ("UPCA", "036000291452", 91.0),
    ("EAN8", "96385074", 268.0),
)


def scan_specs(settings: Settings) -> list[PhotoSpec]:
    """Row k's photos without a code: 12 MP meal photos with daylight noise, which prepare the
    fastest of the bench's photos, so the scan's share of their preparation is the largest."""
    return [spec(TWELVE_MP, seed, DAYLIGHT) for seed in SCAN_SEEDS[: settings.scan_photos]]


def row_k(bench: Bench) -> list[report.Row]:
    """The barcode scan's added time on 12 MP photos without a code, against their preparation;
    whether codes turned 90 degrees are read."""
    os.environ.setdefault("LOG_LEVEL", "ERROR")  # importing app builds an app; keep it quiet
    import zxingcpp

    import app as service
    import barcodes
    from tests import barcode_photos

    settings = bench.settings
    photos = bench.library.load(scan_specs(settings))
    decoded = [barcode_photos.service_decode(photo) for photo in photos]
    config = service.Config()
    budget = service.DecodeBudget(config.decode_budget_mb, config.model_queue_timeout)
    formats = barcodes.RETAIL_FORMATS
    # The scan as the service runs it, its whole preparation, and two settings it did not take:
    # zxing-cpp on the RGB decode itself (no grayscale copy) and without its downscaled passes.
    calls: dict[str, Callable[[int], object]] = {
        "scan": lambda index: barcodes.read_barcodes(decoded[index]),
        "prepare": lambda index: service.prepare_image(
            photos[index], config.image_max_side, config.image_max_pixels, budget
        ),
        "rgb": lambda index: zxingcpp.read_barcodes(decoded[index], formats=formats),
        "no downscale": lambda index: zxingcpp.read_barcodes(
            decoded[index].convert("L"), formats=formats, try_downscale=False
        ),
    }
    for call in calls.values():  # one untimed warm-up call of each kind
        call(0)
    times: dict[str, list[float]] = {kind: [] for kind in calls}
    for round_number in range(settings.scan_rounds):
        for index in range(len(photos)):
            flip = (round_number + index) % 2 == 1
            for kind in reversed(calls) if flip else calls:
                started = time.perf_counter()
                calls[kind](index)
                times[kind].append(time.perf_counter() - started)
    scan, prepare = statistics.median(times["scan"]), statistics.median(times["prepare"])
    share = scan / prepare
    found = [barcodes.read_barcodes(image) for image in decoded]
    return [
        report.Row(
            "k. barcode scan of a 12 MP photo without a code",
            f"{ms(scan)} (p95 {ms(percentile(times['scan'], 0.95))}) `read_barcodes`",
            f"{ms(prepare)} (p95 {ms(percentile(times['prepare'], 0.95))}) `prepare_image`",
            f"{share:.1%} of the preparation",
            f"≤ {SCAN_GOAL_MS:g} ms and ≤ {SCAN_SHARE_GOAL:.0%}",
            scan * 1000 <= SCAN_GOAL_MS and share <= SCAN_SHARE_GOAL,
            [
                f"{len(photos)} distinct 4032x3024 meal photos without a code "
                f"({mean_size(photos)} on average, daylight noise, EXIF orientations "
                f"{sorted({item.orientation for item in scan_specs(settings)})}), in the harness "
                f"process; {settings.scan_rounds} round(s), each visiting the photos in turn, "
                "the calls in an order that alternates; medians and p95 over every call, after "
                "one untimed warm-up call of each kind.",
                "The scan is `barcodes.read_barcodes` on the service's reduced decode of the "
                "photo (`open_image`, `reduce_while_decoding`, `load`, `exif_transpose`: "
                f"{decoded[0].width}x{decoded[0].height}), which the preparation has already "
                "paid for, so only the scan is added: a grayscale copy, then zxing-cpp for "
                "EAN-13, EAN-8, UPC-A and UPC-E, turned codes and downscaled passes included. "
                "The baseline is `app.prepare_image` on the same bytes, in turn with it.",
                f"Settings not taken, timed in the same rounds: zxing-cpp on the RGB decode "
                f"itself {ms(statistics.median(times['rgb']))}, the grayscale scan without "
                f"downscaled passes {ms(statistics.median(times['no downscale']))}.",
                f"Codes found: {sum(len(codes) for codes in found)} (none expected).",
            ],
        ),
        turned_codes_row(),
    ]


def turned_codes_row() -> report.Row:
    """Codes turned about 90 degrees on 12 MP package photos, a quarter of the width: all read?"""
    import zxingcpp

    import barcodes
    from tests import barcode_photos

    read = []
    for seed, (name, content, angle) in enumerate(TURNED_CODES):
        barcode_format = getattr(zxingcpp.BarcodeFormat, name)
        label = barcode_photos.Label(barcode_photos.bars(barcode_format, content), angle=angle)
        photo = barcode_photos.package_photo(barcode_photos.TWELVE_MP, [label], seed=seed)
        expected = barcodes.lookup_form(content)
        codes = barcodes.read_barcodes(barcode_photos.service_decode(photo))
        read.append(codes == (expected,))
    return report.Row(
        "k. codes turned 90°, 12 MP, a quarter of the width",
        f"{sum(read)} of {len(read)} read",
        f"{len(read)} codes",
        f"{sum(read) / len(read):.0%}",
        "all read",
        all(read),
        [
            "`tests/barcode_photos.py` package photos (a printed carton, uneven light, grain, "
            "the code on a white label, blur radius 0.8, JPEG quality 88), 4032x3024, the bars "
            "a quarter of the width, turned "
            + ", ".join(f"{angle:g}° ({name} {content})" for name, content, angle in TURNED_CODES)
            + "; read by `read_barcodes` on the service's reduced decode.",
        ],
    )


# ------------------------------------------------------------------------- l. known products


PRODUCT_GOAL = 0.1  # a known product's median latency, at most this share of a model-path miss's


def row_l(bench: Bench) -> list[report.Row]:
    """Photos of known packaged products, answered from Open Food Facts without the model, against
    photos the model analyses, interleaved on the real gunicorn; every request a cache miss."""
    settings, stack = bench.settings, bench.require(bench.stack)
    server, model = bench.require(bench.second), bench.require(stack.model)
    open_food_facts = bench.require(stack.open_food_facts)
    plan = packaged.Plan(settings.product_requests)
    started = time.monotonic()
    packages = plan.package_photos()
    drawn = time.monotonic() - started
    stack.flush_redis()
    sent = packaged.send_requests(
        server, model, open_food_facts, bench.token, bench.library, plan, packages
    )
    return [known_product_row(sent, plan, packages, drawn, settings)]


def from_the_product(request: packaged.Request) -> bool:
    """A fresh 200 made from the product on the photo: no model call, its code looked up once."""
    return (
        request.sent.status == 200
        and request.sent.source == "openfoodfacts"
        and request.sent.model_calls == 0
        and request.looked_up == [request.code]
    )


def from_the_model(request: packaged.Request) -> bool:
    """A fresh 200 from one model call, with no product lookup (the photo has no code)."""
    return (
        request.sent.status == 200
        and request.sent.source == "api"
        and request.sent.model_calls == 1
        and not request.looked_up
    )


def known_product_row(
    sent: packaged.Requests,
    plan: packaged.Plan,
    packages: list[bytes],
    drawn: float,
    settings: Settings,
) -> report.Row:
    """A known product's latency against a model-path miss's, and how each was answered."""
    delay = settings.model_delay
    known = [request.sent.seconds for request in sent.known]
    misses = [request.sent.seconds for request in sent.misses]
    known_p50, miss_p50 = statistics.median(known), statistics.median(misses)
    ratio = known_p50 / miss_p50
    codes = plan.codes()
    from_products = sum(from_the_product(request) for request in sent.known)
    from_model = sum(from_the_model(request) for request in sent.misses)
    each_once = all(sent.lookups[code] == 1 for code in codes)
    only_these = sum(sent.lookups.values()) == len(codes)
    ok = (
        from_products == len(sent.known)
        and from_model == len(sent.misses)
        and sent.model_calls == sent.misses_sent
        and each_once
        and only_these
    )
    outcomes = Counter(
        f"{kind} HTTP {request.sent.status} {request.sent.source or '(no source)'}, "
        f"{request.sent.model_calls} model call(s), {len(request.looked_up)} lookup(s)"
        for kind, requests in (("known product:", sent.known), ("model path:", sent.misses))
        for request in requests
    )
    none_or_some = "none" if sent.model_calls == sent.misses_sent else "SOME"
    service_side = [seconds - delay for seconds in misses]
    miss_side = statistics.median(service_side)
    to_lookup = statistics.median(request.to_lookup for request in sent.known)
    to_model = statistics.median(request.sent.to_model for request in sent.misses)
    cpu = {
        kind: statistics.mean(request.sent.worker_cpu for request in requests)
        for kind, requests in (("known", sent.known), ("miss", sent.misses))
    }
    meal_bytes = [request.sent.upload_bytes for request in sent.misses]
    package_bytes = [request.sent.upload_bytes for request in sent.known]
    return report.Row(
        "l. a known product's 12 MP photo, answered from Open Food Facts (miss)",
        f"{ms(known_p50)} (p95 {ms(percentile(known, 0.95))}) per known-product request",
        f"{ms(miss_p50)} (p95 {ms(percentile(misses, 0.95))}) per model-path miss, "
        f"{delay:g} s model",
        f"{ratio:.3f}x the miss's",
        f"≤ {PRODUCT_GOAL:g}x",
        ok and ratio <= PRODUCT_GOAL,
        [
            "`gunicorn app:app` (gunicorn.conf.py defaults, the bench's Redis, flushed first, "
            "`OPENFOODFACTS_URL` the bench's loopback Open Food Facts); one client, one "
            f"keep-alive connection, one request at a time: after one untimed request of each "
            f"kind, {len(sent.known)} known-product requests and {len(sent.misses)} model-path "
            "ones, interleaved (the order alternating), one photo each, every photo sent once, "
            "so every request is a cache miss. Latency: request sent to answer read.",
            f"Known products: {len(codes)} EAN-13 codes ({codes[0]} to {codes[-1]}, check digits "
            "computed, 200-299 being codes no real product carries), each a product in the "
            "loopback Open Food Facts with Nutella's values, each on its own 4032x3024 package "
            f"photo (`tests/barcode_photos.py`, the bars {packaged.BARS_SHARE:.0%} of the width, "
            f"{megabytes(min(len(p) for p in packages))}-{megabytes(max(len(p) for p in packages))}"
            f", drawn in {drawn:.1f} s before anything was timed). Model path: new 4032x3024 "
            "meal photos without a code (daylight noise, EXIF orientation and GPS, as row j). "
            f"Upload p50: {megabytes(round(statistics.median(package_bytes)))} and "
            f"{megabytes(round(statistics.median(meal_bytes)))}.",
            f"Latency per request, known product: {', '.join(ms(v) for v in known)}; model "
            f"path: {', '.join(ms(v) for v in misses)}.",
            f"Answers: {describe(outcomes)}. Source openfoodfacts on {from_products} of "
            f"{len(sent.known)} known-product answers; the fake model received "
            f"{sent.model_calls} call(s) during the row for {sent.misses_sent} model-path "
            f"requests (the untimed one included), so {none_or_some} for the known "
            "products; Open Food Facts received "
            f"{sum(sent.lookups.values())} lookup(s) for {len(codes)} products, "
            f"{'one per product' if each_once and only_these else 'NOT one per product'}, "
            "none for a meal photo.",
            f"What the scan and the lookup add: a known product's latency (p50 {ms(known_p50)}) "
            f"against a model-path miss's service-side time, its latency less the "
            f"{delay:g} s delay (p50 {ms(miss_side)}): {ms(abs(known_p50 - miss_side))} "
            f"{'more' if known_p50 > miss_side else 'less'} (the known product skips the "
            "preparation and the model's request and answer; both scan). From sending to the "
            f"lookup's arrival at Open Food Facts (upload, decode, scan) p50 {ms(to_lookup)}, "
            f"then the lookup and the answer {ms(known_p50 - to_lookup)}; a miss's time to the "
            f"model call's arrival (upload, decode, scan, preparation) p50 {ms(to_model)}. "
            "Row k times the scan alone.",
            f"The workers' CPU per request (from /proc/<pid>/stat in 10 ms ticks, the mean): "
            f"known product {ms(cpu['known'])}, model path {ms(cpu['miss'])}; load average at "
            f"the end {report.load_average()}.",
        ],
    )


# ------------------------------------------------------------------------- the run


def start_stack(bench: Bench) -> None:
    """Start Redis, the fakes and the gunicorns the selected rows need; wait until ready."""
    rows = bench.settings.rows
    stack = Stack(bench.settings.model_delay)
    bench.stack = stack
    bench.token = stack.token()
    if rows & MAIN_ROWS:
        bench.main = stack.start_gunicorn("main", MAIN_TARGET)
    if rows & {"d", "g", "j", "l"}:
        bench.second = stack.start_gunicorn("second", SERVICE_TARGET)
    if "g" in rows:
        store = stack.embedded_store(EMBEDDED)
        bench.embedded = stack.start_gunicorn(EMBEDDED, SERVICE_TARGET, **store)
    if "c" in rows:
        bench.old = stack.start_gunicorn("old", SERVICE_TARGET, **OLD_CONFIG)
    stack.wait_until_ready(*stack.gunicorns.values())
    bench.workers_running = {name: len(g.worker_pids()) for name, g in stack.gunicorns.items()}
    if bench.main is not None:
        peaks = [status_kb(pid, "VmHWM") or 0 for pid in bench.main.worker_pids()]
        bench.idle_kb = max(peaks, default=0)


def install_signal_handlers(limit: int) -> None:
    """SIGTERM and SIGINT unwind (so everything is stopped); SIGALRM bounds the whole run."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def too_long(_signum: int, _frame: FrameType | None) -> None:
        raise HarnessTimeout(f"the run took longer than {limit} s")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(limit)


def caveats(settings: Settings) -> list[str]:
    """What a reader should keep in mind about every number above."""
    return [
        f"The clients ran on the same {os.cpu_count()} cores as the servers: compare ratios, "
        "not absolute numbers; the other caveats are in bench/README.md.",
        *(["Quick run: small samples, only a smoke test."] if settings.quick else []),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the selected rows, print the table and write RESULTS.md; 0 unless the harness broke."""
    settings = parse_settings(argv)
    command = " ".join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    started = time.monotonic()
    digest_before = report.app_digest()
    load_at_start = report.load_average()
    install_signal_handlers(settings.time_limit)
    with tempfile.TemporaryDirectory(prefix="image-service-bench-photos-") as folder:
        bench = Bench(settings, PhotoLibrary(Path(folder)))
        bench.gunicorn_conf[DEFAULTS] = report.gunicorn_settings({})
        if "c" in settings.rows:
            bench.gunicorn_conf[OLD] = report.gunicorn_settings(OLD_CONFIG)
        try:
            generate_photos(bench)
            if "a" in settings.rows:
                bench.run_row("a", lambda: row_a(bench))
            if "h" in settings.rows:
                bench.run_row("h", lambda: row_h(bench))
            if "k" in settings.rows:
                bench.run_row("k", lambda: row_k(bench))
            if settings.rows - {"a", "h", "k"}:
                print("[bench] starting Redis, fake model, User Service, gunicorns ...", flush=True)
                start_stack(bench)
                measured = {
                    "b": row_b,
                    "c": row_c,
                    "d": row_d,
                    "e": row_e,
                    "f": row_f,
                    "g": row_g,
                    "i": row_i,
                    "j": row_j,
                    "l": row_l,
                }
                for name, measure in measured.items():
                    if name in settings.rows:
                        bench.run_row(name, functools.partial(measure, bench))
        except (HarnessTimeout, SystemExit, KeyboardInterrupt) as stop:
            print(f"[bench] stopping early: {type(stop).__name__} {stop}", flush=True)
            raise
        finally:
            signal.alarm(0)
            if bench.stack is not None:
                print("[bench] stopping the stack ...", flush=True)
                bench.stack.close()
    notes = caveats(settings)
    if report.app_digest() != digest_before:
        notes.insert(
            0,
            "app.py or nutrition.py CHANGED while this run was in progress: rerun before "
            "trusting it.",
        )
    results = report.Report(
        command=command,
        started=started_at,
        seconds=time.monotonic() - started,
        quick=settings.quick,
        model_delay=settings.model_delay,
        fingerprint=report.source_fingerprint(),
        machine=report.machine_lines(bench.gunicorn_conf, load_at_start, bench.workers_running),
        rows=bench.rows,
        caveats=notes,
        goal_notes=bench.goal_notes,
    )
    bench.rows.sort(key=lambda row: ROWS.index(row.label[0]) if row.label[0] in ROWS else 99)
    print()
    print(report.text_table(bench.rows))
    print()
    print("\n".join(report.goal_summary(bench.rows)))
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(results.markdown(), encoding="utf-8")
    print(f"\n[bench] wrote {settings.out} in {results.seconds:.0f} s", flush=True)
    return 1 if bench.failed else 0


def generate_photos(bench: Bench) -> None:
    """Draw every photo the selected rows need, in parallel, before anything is timed."""
    settings, rows = bench.settings, bench.settings.rows
    specs: list[PhotoSpec] = []
    if "a" in rows:
        specs += [item for items in prep_specs(settings).values() for item in items]
    if rows & {"b", "g"}:
        specs += [spec(THREE_MP, 1000 + n) for n in range(settings.hit_photos)]
    if "c" in rows:
        specs += [spec(THREE_MP, 2000 + n) for n in range(settings.miss_photos)]
    if "d" in rows:
        specs.append(spec(THREE_MP, 3000))
    if "e" in rows:
        specs.append(spec(TWELVE_MP, 100))
    if "g" in rows:
        specs += [spec(THREE_MP, seed) for seed in DUPLICATE_SEEDS]
    if "j" in rows:
        specs += photo_sets.Plan(settings.set_requests).specs()
    if "k" in rows:
        specs += scan_specs(settings)
    if "l" in rows:
        specs += packaged.Plan(settings.product_requests).meal_specs()
    started = time.monotonic()
    bench.library.generate(specs)
    print(
        f"[bench] generated {len(specs)} photos in {time.monotonic() - started:.1f} s", flush=True
    )


if __name__ == "__main__":
    sys.exit(main())
