"""llama.cpp's HTTP server (from the `xllamacpp` wheel) in a process of its own, always stopped.

Run as a module, it serves one GGUF model until SIGTERM:
``python -m tests.servers_llama.llama_server --model M.gguf --port N --alias NAME [--mmproj P]``.
`start_llama_server` launches that process from the tests and waits until it answers.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.fakes import die_with_parent, free_port
from tests.servers import ROOT

STARTUP_TIMEOUT = 120.0  # seconds until /health answers 200: loading takes a few
CONTEXT_TOKENS = 4096  # room for the service's instructions, its schema, the photo and the answer
# One thread generates (a token is too little work to share between threads that wait on each
# other), two read the prompt.
GENERATING_THREADS = 1
PROMPT_THREADS = 2


class LlamaServerFailed(RuntimeError):
    """The server exited, or did not answer in time; the message ends with its output."""


@dataclass
class LlamaServer:
    """One running llama.cpp server: where it answers and the file that receives its output."""

    process: subprocess.Popen[bytes]
    port: int
    alias: str
    log_path: Path

    @property
    def url(self) -> str:
        """Its root, where /health and /v1 are."""
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_until_ready(self, deadline: float) -> None:
        """Poll /health until the model is loaded; raise LlamaServerFailed if it never is."""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LlamaServerFailed(
                    f"llama.cpp's server exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet
            time.sleep(0.1)
        raise LlamaServerFailed(f"llama.cpp's server did not answer in time:\n{self.output()}")

    def stop(self) -> None:
        """SIGTERM the server, and SIGKILL it if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_llama_server(
    model: Path, folder: Path, *, alias: str, mmproj: Path | None = None
) -> LlamaServer:
    """Start the server on a free port and wait until it answers; it fails loudly, never skips."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tests.servers_llama.llama_server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--alias",
        alias,
    ]
    if mmproj is not None:
        command += ["--mmproj", str(mmproj)]
    log_path = folder / f"llama-server-{port}.log"
    with open(log_path, "wb") as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # only calls prctl: fork-safe
        )
    server = LlamaServer(process=process, port=port, alias=alias, log_path=log_path)
    try:
        server.wait_until_ready(time.monotonic() + STARTUP_TIMEOUT)
    except BaseException:
        server.stop()
        raise
    return server


def serve(model: Path, port: int, alias: str, mmproj: Path | None) -> None:
    """Load the model (and projector) into llama.cpp's server and serve until SIGTERM."""
    import xllamacpp  # type: ignore[import-untyped]  # the wheel ships no type information

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    if mmproj is not None:
        params.mmproj.path = str(mmproj)
    params.model_alias = {alias}
    params.port = port
    params.n_ctx = CONTEXT_TOKENS
    params.n_parallel = 1
    params.cpuparams.n_threads = GENERATING_THREADS
    params.cpuparams_batch.n_threads = PROMPT_THREADS
    for threads in (params.cpuparams, params.cpuparams_batch):
        # Threads sleep instead of spinning between steps: on a machine busy with other work a
        # spinning thread pool slows the answer down many times over.
        threads.poll = 0
    # The server starts listening in its own threads; this one only waits to be told to stop.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = xllamacpp.Server(params)
    print(f"serving {alias} on {server.listening_address}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def main() -> None:
    """The command line: the model, the port, the alias and an optional projector."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alias", required=True)
    parser.add_argument("--mmproj", type=Path)
    arguments = parser.parse_args()
    serve(arguments.model, arguments.port, arguments.alias, arguments.mmproj)


if __name__ == "__main__":
    main()
