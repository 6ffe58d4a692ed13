"""Row j: several photos of one meal in one request, against one photo.

On the real gunicorn (`app:app`, on the bench's stack), one client sends requests one after
another (closed loop) with one or three distinct 12 MP photos each, interleaved, every photo new
(a cache miss); the service-side time is each request's latency less the model's delay, and the
workers' CPU time is read from /proc around each request. One five-photo request gives the image
parts the model receives for the largest set.

Between the pairs of requests, the harness process times the service's own steps on the first
request's photos (`ServiceSteps`): multipart parsing and hashing of one and of three photos, and
preparation by `app.prepare_photos` (at once, in a thread pool, as the service does) against
`app.prepare_image` one after another, so both see the machine in the same state and the
service-side time can be split into its parts.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from bench.load import Client, PhotoSet
from bench.photos import DAYLIGHT, TWELVE_MP, PhotoLibrary, PhotoSpec, spec
from bench.stack import DelayedModel, cpu_ticks
from decode_budget import DecodeBudget
from tests.fakes import RecordedRequest
from tests.servers import Gunicorn

ANALYZE = "/analyze-food"
SET_SIZE = 3  # photos per request measured against one
LARGEST_SET = 5  # MAX_IMAGES's default
ONE_SEED, SET_SEED, LARGEST_SEED, WARM_SEED = 6000, 6100, 6200, 6300
DATA_URL_PREFIX = "data:image/jpeg;base64,"


def photo_spec(seed: int) -> PhotoSpec:
    """A distinct 12 MP phone photo with daylight noise (about 2 MB)."""
    return spec(TWELVE_MP, seed, DAYLIGHT)


@dataclass(frozen=True)
class Plan:
    """Which photos each request of row j sends: every photo is sent once (a cache miss)."""

    requests: int  # timed requests of each kind

    def one_photo(self, number: int) -> list[PhotoSpec]:
        """The photo of the number-th one-photo request."""
        return [photo_spec(ONE_SEED + number)]

    def photo_set(self, number: int) -> list[PhotoSpec]:
        """The photos of the number-th three-photo request."""
        return [photo_spec(SET_SEED + SET_SIZE * number + index) for index in range(SET_SIZE)]

    def largest_set(self) -> list[PhotoSpec]:
        """The photos of the one five-photo request."""
        return [photo_spec(LARGEST_SEED + index) for index in range(LARGEST_SET)]

    def warm_up(self) -> list[list[PhotoSpec]]:
        """An untimed request of each kind first."""
        seeds = range(WARM_SEED, WARM_SEED + 1 + SET_SIZE)
        photos = [photo_spec(seed) for seed in seeds]
        return [photos[:1], photos[1:]]

    def specs(self) -> list[PhotoSpec]:
        """Every photo the row needs, to draw before anything is timed."""
        found = [item for request in self.warm_up() for item in request]
        for number in range(self.requests):
            found += self.one_photo(number) + self.photo_set(number)
        return found + self.largest_set()


@dataclass(frozen=True)
class Sent:
    """One request as the client and the fake model saw it."""

    photos: int
    upload_bytes: int  # the whole multipart body
    seconds: float  # from sending the request to reading the whole answer
    to_model: float  # from sending the request to the model call's arrival
    status: int
    source: str
    photo_count: int | None  # the answer's analysis.photoCount
    model_calls: int
    received: list[tuple[int, int, int]]  # width, height and bytes of each image the model got
    worker_cpu: float  # seconds the gunicorn's workers spent during the request (10 ms ticks)


def image_parts(call: RecordedRequest) -> list[bytes]:
    """The JPEG of every image part of a Chat Completions call, in order."""
    found = []
    for message in call.json().get("messages", []):
        content = message.get("content")
        if message.get("role") != "user" or not isinstance(content, list):
            continue
        for part in content:
            url = (
                part.get("image_url", {}).get("url", "") if part.get("type") == "image_url" else ""
            )
            if url.startswith(DATA_URL_PREFIX):
                found.append(base64.b64decode(url[len(DATA_URL_PREFIX) :], validate=True))
    return found


def image_size(jpeg: bytes) -> tuple[int, int, int]:
    """Width, height and byte count of a JPEG."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.width, image.height, len(jpeg)


def answer_fields(body: bytes) -> tuple[str, int | None]:
    """The answer's ``source`` and ``analysis.photoCount`` (empty and None when absent)."""
    try:
        answer: dict[str, Any] = json.loads(body)
    except ValueError:
        return "unreadable", None
    count = answer.get("analysis", {}).get("photoCount")
    return str(answer.get("source", "")), count if isinstance(count, int) else None


def send(client: Client, model: DelayedModel, workers: list[int], photos: list[bytes]) -> Sent:
    """POST one set of photos and wait for the answer; pair it with the model call it made and
    the CPU the workers spent meanwhile."""
    upload = PhotoSet(tuple(photos))
    _, _, length = upload.encode()
    calls_before = len(model.calls)
    ticks = cpu_ticks(workers)
    started = time.monotonic()
    answer = client.post(ANALYZE, upload)
    spent = (cpu_ticks(workers) - ticks) / os.sysconf("SC_CLK_TCK")
    calls = model.calls[calls_before:]
    source, photo_count = answer_fields(answer.body)
    arrived = calls[0].received_at - started if calls else float("nan")
    received = [image_size(jpeg) for jpeg in image_parts(calls[0])] if calls else []
    return Sent(
        len(photos),
        length,
        answer.seconds,
        arrived,
        answer.status,
        source,
        photo_count,
        len(calls),
        received,
        spent,
    )


@dataclass(frozen=True)
class Requests:
    """Row j's requests on the gunicorn: one-photo and three-photo ones, and one of five."""

    one: list[Sent]
    three: list[Sent]
    largest: Sent


def send_requests(
    server: Gunicorn,
    model: DelayedModel,
    token: str,
    library: PhotoLibrary,
    plan: Plan,
    between: Callable[[int], object],
) -> Requests:
    """One client, one request at a time: a warm-up of each kind, then one-photo and three-photo
    requests interleaved (the order alternating), ``between(number)`` after each pair, then one
    five-photo request."""
    client = Client(server.port, token, timeout=60)
    workers = server.worker_pids()
    try:
        client.connect()
        for photos in plan.warm_up():
            send(client, model, workers, library.load(photos))
        one: list[Sent] = []
        three: list[Sent] = []
        for number in range(plan.requests):
            kinds: list[tuple[list[Sent], list[PhotoSpec]]] = [
                (one, plan.one_photo(number)),
                (three, plan.photo_set(number)),
            ]
            for found, photos in kinds if number % 2 == 0 else reversed(kinds):
                found.append(send(client, model, workers, library.load(photos)))
            between(number)
        largest = send(client, model, workers, library.load(plan.largest_set()))
    finally:
        client.close()
    return Requests(one, three, largest)


# What the harness process times, by name.
PARALLEL = "prepare_photos, 3 photos"  # app.prepare_photos: a thread pool, as shipped
SERIAL = "prepare_image x 3, in turn"  # app.prepare_image on each photo, one after another
SINGLE = "prepare_photos, 1 photo"
PARSE_ONE, PARSE_THREE = "multipart, 1 photo", "multipart, 3 photos"  # app.read_uploads
HASH_ONE, HASH_THREE = "hash, 1 photo", "hash, 3 photos"  # app.distinct_photos


@dataclass(frozen=True)
class Preparation:
    """In-process timings per call, in seconds, by name: wall time and the process's CPU time
    (every thread's), so the CPU over the wall time is how many cores a call kept busy."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    prepared: list[tuple[int, int, int]]  # width, height and bytes of each of the three JPEGs


class ServiceSteps:
    """The service's own steps on one photo and on three, timed in this process, a round at a
    time; every kind has had one untimed call when the first round starts."""

    def __init__(self, one: bytes, three: list[bytes]) -> None:
        os.environ.setdefault("LOG_LEVEL", "ERROR")  # importing app builds an app; keep it quiet
        import app as service

        config = service.Config()
        budget = DecodeBudget(config.decode_budget_mb, config.model_queue_timeout)
        single = service.distinct_photos([(one, "meal-1.jpg")])
        photos = service.distinct_photos(
            [(photo, f"meal-{n}.jpg") for n, photo in enumerate(three, 1)]
        )
        if len(photos) != len(three):
            raise RuntimeError("the three photos are not distinct")

        def parse(data: list[bytes]) -> Callable[[], object]:
            parts, content_type, _ = PhotoSet(tuple(data)).encode()
            body = b"".join(parts)

            def read() -> object:
                with service.app.test_request_context(
                    ANALYZE, method="POST", data=body, content_type=content_type
                ):
                    return service.read_uploads(config.max_images)

            return read

        def serial() -> object:
            return [
                service.prepare_image(
                    photo.data, config.image_max_side, config.image_max_pixels, budget, scan=True
                ).jpeg
                for photo in photos
            ]

        self.calls: dict[str, Callable[[], object]] = {
            PARALLEL: lambda: service.prepare_photos(photos, config, budget, scan=True),
            SERIAL: serial,
            SINGLE: lambda: service.prepare_photos(single, config, budget, scan=True),
            PARSE_ONE: parse([one]),
            PARSE_THREE: parse(three),
            HASH_ONE: lambda: service.distinct_photos([(one, None)]),
            HASH_THREE: lambda: service.distinct_photos([(photo, None) for photo in three]),
        }
        for call in self.calls.values():
            call()
        self.wall: dict[str, list[float]] = {name: [] for name in self.calls}
        self.cpu: dict[str, list[float]] = {name: [] for name in self.calls}
        prepared = service.prepare_photos(photos, config, budget, scan=True)
        self.prepared = [image_size(photo.jpeg) for photo in prepared]

    def run_round(self, number: int) -> None:
        """Time every step once, the order alternating from one round to the next."""
        order = list(self.calls) if number % 2 == 0 else list(reversed(self.calls))
        for name in order:
            started, cpu_started = time.perf_counter(), time.process_time()
            self.calls[name]()
            self.wall[name].append(time.perf_counter() - started)
            self.cpu[name].append(time.process_time() - cpu_started)

    def result(self) -> Preparation:
        """What the rounds measured."""
        return Preparation(self.wall, self.cpu, self.prepared)
