"""The real stack on loopback: a Redis of its own, the fake model, User Service and Open Food
Facts, and gunicorns.

Everything is started by `Stack` and stopped by `Stack.close()` (also on failure: use it in a
`with` block). The gunicorns are started by the tests' launcher (`tests/servers.py`), so their
masters get SIGTERM from Linux if the harness dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import jwt

from tests.fakes import (
    ChatCompletionsServer,
    ClosesOnExit,
    RecordedRequest,
    RedisServer,
    Reply,
    UserServiceServer,
)
from tests.open_food_facts import OpenFoodFactsServer
from tests.servers import Gunicorn, start_gunicorn

STARTUP_TIMEOUT = 30.0


class DelayedModel(ChatCompletionsServer):
    """The tests' Chat Completions server, answering every call after `delay` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        super().__init__()

    def default_reply(self, request: RecordedRequest) -> Reply:
        """The usual analysis, late by the model delay."""
        reply = super().default_reply(request)
        reply.delay = self.delay
        return reply


def wait_until_idle(server: Gunicorn, deadline: float, window: float = 0.3) -> None:
    """Wait until the workers have finished importing: almost no CPU over `window` s."""
    ticks = os.sysconf("SC_CLK_TCK")
    while time.monotonic() < deadline:
        before = cpu_ticks(server.worker_pids())
        time.sleep(window)
        if (cpu_ticks(server.worker_pids()) - before) / ticks < 0.05 * window:
            return


def cpu_ticks(pids: list[int]) -> int:
    """User plus system CPU time of these processes, in clock ticks."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


class Stack(ClosesOnExit):
    """Redis, the fake model, the fake User Service, the fake Open Food Facts and any number of
    gunicorns; every gunicorn looks products up in the fake one, never in the real one."""

    def __init__(self, model_delay: float) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="image-service-bench-"))
        self.jwt_secret = secrets.token_hex(32)
        self.redis_password = secrets.token_hex(16)
        self.openai_key = "bench-" + secrets.token_hex(12)
        self.gunicorns: dict[str, Gunicorn] = {}
        self.redis: RedisServer | None = None
        self.model: DelayedModel | None = None
        self.user_service: UserServiceServer | None = None
        self.open_food_facts: OpenFoodFactsServer | None = None
        try:
            self.redis = RedisServer(password=self.redis_password)
            self.model = DelayedModel(model_delay)
            self.user_service = UserServiceServer()
            self.open_food_facts = OpenFoodFactsServer()
        except BaseException:
            self.close()
            raise

    def token(self) -> str:
        """An access token the service accepts for the next hour."""
        now = int(time.time())
        claims = {"sub": "bench-user", "type": "access", "iat": now, "exp": now + 3600}
        return jwt.encode(claims, self.jwt_secret, algorithm="HS256")

    def start_gunicorn(self, name: str, target: str, **overrides: str | None) -> Gunicorn:
        """Start `gunicorn <target>` serving the stack, without waiting for it.

        Whatever the overrides do not name keeps gunicorn.conf.py's default; an override of
        None removes the stack's own setting (``REDIS_HOST=None``: no Redis).
        """
        assert self.redis is not None
        assert self.model is not None
        assert self.user_service is not None
        assert self.open_food_facts is not None
        settings: dict[str, str | None] = {
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(self.redis.port),
            "REDIS_PASSWORD": self.redis_password,
            "OPENAI_API_KEY": self.openai_key,
            "OPENAI_BASE_URL": self.model.base_url,
            "USER_SERVICE_URL": self.user_service.url,
            "OPENFOODFACTS_URL": self.open_food_facts.url,
            "JWT_SECRET": self.jwt_secret,
            **overrides,
        }
        server = start_gunicorn(target, self.workdir / name, settings, name=name)
        self.gunicorns[name] = server
        return server

    def wait_until_ready(self, *servers: Gunicorn) -> None:
        """Wait for every server to answer and its workers to settle, within one deadline."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for server in servers:
            server.wait_until_live(deadline)
        for server in servers:
            wait_until_idle(server, deadline)

    def embedded_store(self, name: str) -> dict[str, str | None]:
        """Overrides for a gunicorn without Redis: the embedded store, in the stack's folder."""
        return {
            "REDIS_HOST": None,
            "REDIS_PORT": None,
            "REDIS_PASSWORD": None,
            "STORE_PATH": str(self.workdir / name / "store.sqlite3"),
        }

    def flush_redis(self) -> None:
        """Forget every cached analysis."""
        assert self.redis is not None
        self.redis.flush()

    def close(self) -> None:
        """Stop gunicorns, fakes and Redis; remove the work folder. Safe to call twice."""
        servers, self.gunicorns = list(self.gunicorns.values()), {}
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait_stopped()
            server.kill()
        for fake in (self.model, self.user_service, self.open_food_facts):
            if fake is not None:
                fake.close()
        if self.redis is not None:
            self.redis.stop()
        self.model = self.user_service = self.open_food_facts = self.redis = None
        shutil.rmtree(self.workdir, ignore_errors=True)


class PeakMemory:
    """Samples the workers' peak resident memory (VmHWM) while a block runs.

    On entry each current worker's peak is reset to its present size (``5 > clear_refs``), so
    the peak belongs to the block; workers that start during the block are sampled too.
    """

    def __init__(self, server: Gunicorn, interval: float = 0.1) -> None:
        self.server = server
        self.interval = interval
        self.peak_kb = 0
        self.workers_seen: set[int] = set()
        self.reset_ok = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> Self:
        """Reset the workers' peaks and start sampling."""
        for pid in self.server.worker_pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self.reset_ok = False
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop sampling, after one last sample."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def sample(self) -> None:
        """Read every worker's VmHWM once."""
        for pid in self.server.worker_pids():
            peak = status_kb(pid, "VmHWM")
            if peak is not None:
                self.workers_seen.add(pid)
                self.peak_kb = max(self.peak_kb, peak)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def status_kb(pid: int, name: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status, such as VmHWM or VmRSS."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
