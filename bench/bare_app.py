"""The service plus one bare endpoint, the ceiling the cache-hit path is measured against.

`gunicorn bench.bare_app:application`, started from the repository root so `gunicorn.conf.py`
applies, serves the real `app.app` for every path but ``POST /bench/bare-upload``. That one reads
the ``image`` part exactly as the service does (same request class, same body and form limits)
and answers ``{"ok": true, "bytes": n}``: no token, no hashing, no cache, no logging, so the
difference between it and a cache hit is what the service adds. Nothing here touches app.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

import app as service

BARE_PATH = "/bench/bare-upload"
UPLOAD_LIMITS = ("MAX_CONTENT_LENGTH", "MAX_FORM_MEMORY_SIZE", "MAX_FORM_PARTS")


def create_bare_app(real: Flask) -> Flask:
    """A Flask app with one view that reads the upload the way ``real`` does, and answers."""
    bare = Flask("bench_bare_upload", static_folder=None)
    bare.request_class = real.request_class
    bare.config.update({name: real.config[name] for name in UPLOAD_LIMITS if name in real.config})

    @bare.post(BARE_PATH)
    def bare_upload() -> ResponseReturnValue:
        upload = request.files.get("image")
        size = len(upload.stream.read()) if upload is not None else 0
        return jsonify(ok=True, bytes=size)

    return bare


class BareUploadDispatcher:
    """WSGI: ``POST /bench/bare-upload`` goes to the bare view, everything else to the service."""

    def __init__(self, real: Flask) -> None:
        self.real = real
        self.bare = create_bare_app(real)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        """Route one request."""
        if environ.get("PATH_INFO") == BARE_PATH and environ.get("REQUEST_METHOD") == "POST":
            return self.bare(environ, start_response)
        return self.real(environ, start_response)


application = BareUploadDispatcher(service.app)
