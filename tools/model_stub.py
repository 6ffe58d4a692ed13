"""A development vision model: an OpenAI-compatible Chat Completions server, standard library only.

    PORT=8090 python tools/model_stub.py
    OPENAI_BASE_URL=http://localhost:8090/v1 OPENAI_API_KEY=unused make run

POST /v1/chat/completions (or /chat/completions) answers every request with the same analysis
of a salmon plate, in the shape the Image Service asks for (structured output), whatever the
photo; GET /v1/models/<id> says that any model exists; GET /health answers 200 and GET /stats
how many completions it served. MODEL_STUB_DELAY (seconds, default 0) makes each answer wait,
like a real model. Not a model: for running the stack without an OpenAI key.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from stub_http import JsonHandler, serve_until_stopped

MAX_BODY_BYTES = 32 * 1024 * 1024
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS_PREFIXES = ("/v1/models/", "/models/")
ANALYSIS: dict[str, Any] = {
    "isFood": True,
    "name": "Grilled Salmon with Asparagus",
    "items": [
        {
            "name": "grilled salmon fillet",
            "description": "grilled salmon fillet",
            "cookingMethod": "grilled",
            "grams": 150,
            "calories": 310,
            "protein": 34,
            "carbs": 0,
            "fat": 19,
            "confidence": 0.9,
        },
        {
            "name": "steamed asparagus",
            "description": "steamed asparagus",
            "cookingMethod": "steamed",
            "grams": 90,
            "calories": 20,
            "protein": 2,
            "carbs": 4,
            "fat": 0.2,
            "confidence": 0.8,
        },
        {
            "name": "olive oil",
            "description": "Oil, olive, salad or cooking",
            "cookingMethod": None,
            "grams": 5,
            "calories": 44,
            "protein": 0,
            "carbs": 0,
            "fat": 5,
            "confidence": 0.6,
        },
    ],
    "caloriesRange": {"low": 340, "high": 460},
    "servingSize": "1 fillet, 6 spears",
    "ingredients": ["salmon", "asparagus", "olive oil"],
    "assumptions": ["salmon cooked with a teaspoon of oil"],
    "suggestions": ["brown rice for more carbohydrates", "a yoghurt with fruit"],
    "confidence": 0.85,
}


def completion(model: str) -> dict[str, Any]:
    """A chat.completion whose message content is the analysis as JSON."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": json.dumps(ANALYSIS), "refusal": None},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 900, "completion_tokens": 80, "total_tokens": 980},
    }


def openai_error(message: str) -> dict[str, Any]:
    """An error body in OpenAI's shape."""
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }


class ModelHandler(JsonHandler):
    """Routes the three endpoints; every answer is JSON."""

    server: ModelServer

    def do_GET(self) -> None:
        """GET /health, GET /stats and GET /v1/models/<id>."""
        path = urlsplit(self.path).path
        if path == "/health":
            self.answer(HTTPStatus.OK, {"status": "healthy", "service": "model-stub"})
        elif path == "/stats":
            self.answer(HTTPStatus.OK, {"completions": self.server.completions})
        elif path.startswith(MODELS_PREFIXES):
            model = path.rsplit("/", 1)[1]
            self.answer(
                HTTPStatus.OK,
                {"id": model, "object": "model", "created": 0, "owned_by": "model-stub"},
            )
        else:
            self.answer(HTTPStatus.NOT_FOUND, openai_error(f"no route for GET {path}"))

    def do_POST(self) -> None:
        """POST /v1/chat/completions."""
        path = urlsplit(self.path).path
        if path not in COMPLETION_PATHS:
            self.answer(HTTPStatus.NOT_FOUND, openai_error(f"no route for POST {path}"))
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.answer(HTTPStatus.BAD_REQUEST, openai_error("a JSON body with Content-Length"))
            return
        try:
            request = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            self.answer(HTTPStatus.BAD_REQUEST, openai_error("the body is not JSON"))
            return
        if not isinstance(request, dict):
            self.answer(HTTPStatus.BAD_REQUEST, openai_error("the body must be a JSON object"))
            return
        time.sleep(self.server.delay)
        self.server.count_completion()
        self.answer(HTTPStatus.OK, completion(str(request.get("model") or "model-stub")))


class ModelServer(ThreadingHTTPServer):
    """The HTTP server, counting the completions its handlers serve."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], delay: float) -> None:
        super().__init__(address, ModelHandler)
        self.delay = delay
        self.completions = 0
        self._lock = threading.Lock()

    def count_completion(self) -> None:
        """One more completion served."""
        with self._lock:
            self.completions += 1


def main() -> int:
    """Serve on 0.0.0.0:$PORT (8090) until SIGTERM or Ctrl-C."""
    port = int(os.environ.get("PORT", "8090"))
    server = ModelServer(("0.0.0.0", port), float(os.environ.get("MODEL_STUB_DELAY", "0")))
    return serve_until_stopped(server, "model-stub")


if __name__ == "__main__":
    sys.exit(main())
