"""The real gunicorn, started from the repository root and always stopped.

One launcher for the tests (`tests.conftest.running_gunicorn` serves the tests' collaborators)
and for the bench (`bench/stack.py`). It imports neither the service nor pytest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.fakes import die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 20.0  # seconds until /health/live answers; a cold import takes about one
SHUTDOWN_TIMEOUT = 15.0  # seconds after SIGTERM; our connections are closed first, so no drain
# What the child may inherit: enough to run Python, nothing the service itself reads. HOME is
# the server's own folder, where gunicorn puts its control socket (~/.gunicorn/gunicorn.ctl).
INHERITED_VARIABLES = ("PATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")


class GunicornFailed(RuntimeError):
    """gunicorn exited, or did not answer in time; the message ends with its output."""


@dataclass
class Gunicorn:
    """One running gunicorn master: where it answers, and the file that receives its output."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    session: requests.Session = field(default_factory=requests.Session)
    last_workers: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Where it answers."""
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything gunicorn, its workers and the service printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The end of its output, for error messages."""
        return "\n".join(self.output().splitlines()[-lines:])

    def worker_pids(self) -> list[int]:
        """The master's children (its workers), read from /proc."""
        pids: list[int] = []
        for children in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids.extend(int(pid) for pid in children.read_text().split())
        return sorted(set(pids))

    def wait_until_live(self, deadline: float) -> None:
        """Poll /health/live until a worker answers 200; raise GunicornFailed if none does."""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GunicornFailed(
                    f"gunicorn {self.name} exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                answer = requests.get(f"{self.url}/health/live", timeout=2)
                if answer.status_code == 200 and self.worker_pids():
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or its worker is still importing the app
            time.sleep(0.05)
        raise GunicornFailed(f"gunicorn {self.name} did not answer in time:\n{self.output()}")

    def terminate(self) -> None:
        """Close our connections and send SIGTERM, remembering the workers in case of a kill."""
        self.session.close()
        self.last_workers = self.worker_pids()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = SHUTDOWN_TIMEOUT) -> int:
        """Wait for the exit code; SIGKILL master and workers if they outlive the timeout."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()

    def stop(self) -> int:
        """SIGTERM gunicorn and return its exit code (-9 if it had to be killed)."""
        self.terminate()
        return self.wait_stopped()

    def kill(self) -> None:
        """SIGKILL a master still running, and the workers it had; a stopped one is left be."""
        self.session.close()
        if self.process.poll() is not None:
            return
        workers = self.worker_pids() or self.last_workers
        self.process.kill()
        self.process.wait()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def gunicorn_environment(
    folder: Path, port: int, settings: Mapping[str, str | None]
) -> dict[str, str]:
    """The environment of a gunicorn living in ``folder`` and listening on 127.0.0.1:port.

    ``settings`` are the service's variables; a None value removes one, leaving
    gunicorn.conf.py's default.
    """
    secrets_dir, metrics_dir = folder / "secrets", folder / "metrics"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    metrics_dir.mkdir(exist_ok=True)
    env = {name: os.environ[name] for name in INHERITED_VARIABLES if name in os.environ}
    env.update(
        HOME=str(folder),
        SECRETS_DIR=str(secrets_dir),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        GUNICORN_BIND=f"127.0.0.1:{port}",
        PYTHONUNBUFFERED="1",
    )
    for name, value in settings.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def start_gunicorn(
    target: str, folder: Path, settings: Mapping[str, str | None], *, name: str = "gunicorn"
) -> Gunicorn:
    """Start `gunicorn <target>` from the repository root on a free port, without waiting."""
    port = free_port()
    env = gunicorn_environment(folder, port, settings)
    log_path = folder / "gunicorn.log"
    with open(log_path, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", target],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # only calls prctl: fork-safe
        )
    return Gunicorn(name=name, process=process, port=port, log_path=log_path)
