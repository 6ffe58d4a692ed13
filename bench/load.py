"""Concurrent HTTP clients: one thread and one keep-alive `http.client` connection per client.

Each request is multipart/form-data with one `image` part (`Upload`), or one per photo of a meal
(`PhotoSet`), and a fresh boundary (as phone apps and HTTP libraries do), sent part by part
without copying the photos, so a client spends its time sending bytes and waiting, not
encoding. The load generator runs on the same machine as the service and competes with it for
the cores; baselines here pay the same price.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

HOST = "127.0.0.1"
DISCONNECTS = (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine)


@dataclass(frozen=True)
class Upload:
    """A photo sent as multipart/form-data with one file part named ``image``."""

    photo: bytes
    filename: str = "meal.jpg"

    @property
    def photo_bytes(self) -> int:
        """The size of the photo itself."""
        return len(self.photo)

    def encode(self) -> tuple[tuple[bytes, ...], str, int]:
        """Body parts, Content-Type and length, with a fresh boundary as real clients use.

        The parts are sent one after the other, so the photo is never copied into a body.
        """
        boundary = uuid.uuid4().hex
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="image"; filename="{self.filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = len(head) + len(self.photo) + len(tail)
        return (head, self.photo, tail), f"multipart/form-data; boundary={boundary}", length


@dataclass(frozen=True)
class PhotoSet:
    """Photos of one meal sent in one multipart/form-data request, each its own ``image`` part."""

    photos: tuple[bytes, ...]

    @property
    def photo_bytes(self) -> int:
        """The size of the photos together."""
        return sum(len(photo) for photo in self.photos)

    def encode(self) -> tuple[tuple[bytes, ...], str, int]:
        """Body parts (a head and the photo for each part, then the closing boundary),
        Content-Type and length, with a fresh boundary; no photo is copied into a body."""
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        for number, photo in enumerate(self.photos, start=1):
            separator = "" if number == 1 else "\r\n"
            parts.append(
                (
                    f"{separator}--{boundary}\r\n"
                    f'Content-Disposition: form-data; name="image"; filename="meal-{number}.jpg"'
                    "\r\nContent-Type: image/jpeg\r\n\r\n"
                ).encode()
            )
            parts.append(photo)
        parts.append(f"\r\n--{boundary}--\r\n".encode())
        length = sum(len(part) for part in parts)
        return tuple(parts), f"multipart/form-data; boundary={boundary}", length


def multipart_upload(photo: bytes) -> Upload:
    """The upload a phone app makes of this photo."""
    return Upload(photo)


@dataclass(frozen=True)
class Answer:
    """One request as the client saw it."""

    status: int
    seconds: float
    finished: float
    body: bytes
    reconnects: int


class Client:
    """One keep-alive connection; reconnects (and resends) when the server closed it."""

    def __init__(self, port: int, token: str, timeout: float) -> None:
        self.port = port
        self.token = token
        self.timeout = timeout
        self.connection = http.client.HTTPConnection(HOST, port, timeout=timeout)

    def connect(self) -> None:
        """Open the TCP connection now, so the timed request does not pay for it."""
        self.connection.connect()

    def post(self, path: str, upload: Upload | PhotoSet, attempts: int = 3) -> Answer:
        """POST an upload; the time includes any reconnect a real client would also make."""
        body, content_type, length = upload.encode()
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": content_type,
            "Content-Length": str(length),
        }
        started = time.perf_counter()
        for attempt in range(1, attempts + 1):
            try:
                self.connection.request("POST", path, body=body, headers=headers)
                response = self.connection.getresponse()
                answer = response.read()
            except DISCONNECTS:
                self.close()
                self.connection = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
                if attempt == attempts:
                    raise
                continue
            finished = time.perf_counter()
            if response.will_close:
                self.close()
                self.connection = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            return Answer(response.status, finished - started, finished, answer, attempt - 1)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Hang up."""
        with contextlib.suppress(OSError):
            self.connection.close()


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of the values lie (linear interpolation)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class LoadResult:
    """What a group of clients saw."""

    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    started_monotonic: float = 0.0  # the start on the clock the fake servers stamp requests with

    @property
    def elapsed(self) -> float:
        """From the start signal to the last answer."""
        return max(0.0, self.finished - self.started)

    @property
    def latencies(self) -> list[float]:
        """Seconds per answered request."""
        return [answer.seconds for answer in self.answers]

    @property
    def requests_per_second(self) -> float:
        """Answered requests over the elapsed time."""
        return len(self.answers) / self.elapsed if self.elapsed > 0 else math.nan

    def statuses(self) -> Counter[int]:
        """How many answers had each status."""
        return Counter(answer.status for answer in self.answers)

    def count_bodies_containing(self, fragment: bytes) -> int:
        """How many answers hold this fragment (e.g. ``"source":"cache"``)."""
        return sum(fragment in answer.body for answer in self.answers)

    @property
    def reconnects(self) -> int:
        """Requests that had to be resent on a new connection."""
        return sum(answer.reconnects for answer in self.answers)


def run_threads(
    jobs: list[tuple[Client, list[tuple[str, Upload]], float | None]], join_timeout: float
) -> LoadResult:
    """Run one thread per (client, requests, deadline); all start together.

    A client with a deadline cycles through its requests until the deadline passes; without
    one it sends each request once. Raises if a thread is still busy after `join_timeout`.
    """
    result = LoadResult()
    lock = threading.Lock()
    barrier = threading.Barrier(len(jobs) + 1)

    def work(client: Client, requests: list[tuple[str, Upload]], duration: float | None) -> None:
        try:
            client.connect()
        except OSError as error:
            with lock:
                result.errors.append(f"connect: {error!r}")
        barrier.wait()
        deadline = None if duration is None else time.perf_counter() + duration
        index = 0
        while index < len(requests) or deadline is not None:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            path, upload = requests[index % len(requests)]
            index += 1
            try:
                answer = client.post(path, upload)
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    result.errors.append(repr(error))
                continue
            with lock:
                result.answers.append(answer)

    threads = [
        threading.Thread(target=work, args=job, daemon=True, name=f"client-{number}")
        for number, job in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=30)
    result.started, result.started_monotonic = time.perf_counter(), time.monotonic()
    stop_by = time.monotonic() + join_timeout
    for thread in threads:
        thread.join(timeout=max(0.0, stop_by - time.monotonic()))
    for client, _, _ in jobs:
        client.close()
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"clients still busy after {join_timeout:g} s")
    result.finished = max((answer.finished for answer in result.answers), default=result.started)
    return result


def closed_loop(
    port: int,
    token: str,
    requests: list[tuple[str, Upload]],
    *,
    concurrency: int,
    duration: float,
    timeout: float = 30.0,
) -> LoadResult:
    """`concurrency` clients each sending the next request as soon as the last one answered."""
    jobs: list[tuple[Client, list[tuple[str, Upload]], float | None]] = []
    for number in range(concurrency):
        offset = number % len(requests)
        mine = requests[offset:] + requests[:offset]
        jobs.append((Client(port, token, timeout), mine, duration))
    return run_threads(jobs, join_timeout=duration + timeout + 5)


def burst(targets: list[tuple[int, str, Upload]], token: str, *, timeout: float) -> LoadResult:
    """One request per (port, path, upload), every client connected first, all sent at once."""
    jobs: list[tuple[Client, list[tuple[str, Upload]], float | None]] = [
        (Client(port, token, timeout), [(path, upload)], None) for port, path, upload in targets
    ]
    return run_threads(jobs, join_timeout=timeout + 5)
