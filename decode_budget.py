"""The decode budget: the bytes of decoded pixels one worker may hold at once.

``decode_cost`` prices an opened image from its header; ``DecodeBudget.reserve`` holds that many
bytes while it is decoded (the rest wait), and a large decode hands its memory back afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
import time
from collections.abc import Iterator

from PIL import Image

from errors import BadRequest, ErrorCode, Overloaded

MIB = 1024 * 1024
# Peak bytes per pixel while an image of each mode is decoded and prepared (the decoded pixels,
# then the RGB or RGBA copy that is shrunk), measured on 60-megapixel images with
# /proc/self/status's VmHWM: a palette expands to 4 bytes a pixel, a 16-bit image is widened to 32
# bits before it is scaled to 8, and WebP's decoder holds a buffer of its own.
PEAK_BYTES_PER_PIXEL = {"1": 6, "L": 6, "P": 6, "RGB": 5, "YCbCr": 5, "CMYK": 9}
PEAK_BYTES_WITH_ALPHA = 10
PEAK_BYTES_WEBP = 17
PEAK_BYTES_OTHER = 11
# A decode this large gives its memory back to the operating system afterwards.
TRIM_AFTER_BYTES = 64 * MIB


def decode_cost(image: Image.Image) -> int:
    """Bytes that decoding and preparing this opened image will hold at its peak."""
    width, height = image.size
    if image.format == "WEBP":
        per_pixel = PEAK_BYTES_WEBP
    elif "transparency" in image.info or image.mode in ("LA", "PA", "RGBA", "RGBa", "La"):
        per_pixel = PEAK_BYTES_WITH_ALPHA
    else:
        per_pixel = PEAK_BYTES_PER_PIXEL.get(image.mode, PEAK_BYTES_OTHER)
    return width * height * per_pixel


class DecodeBudget:
    """The decoded pixels one worker may hold at once (``DECODE_BUDGET_MB``); the rest wait.

    The cost is reserved from the image's header before a byte is decoded, so a burst of tiny
    files that claim huge dimensions waits its turn instead of taking the worker's memory.
    """

    def __init__(self, megabytes: int, wait_seconds: float) -> None:
        self.capacity = megabytes * MIB
        self.free = self.capacity
        self.wait_seconds = wait_seconds
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        """Hold ``cost`` bytes of the budget while decoding, waiting ``MODEL_QUEUE_TIMEOUT``."""
        if cost > self.capacity:
            raise BadRequest(
                f"decoding this image would take {cost // MIB} MB, more than this server's "
                f"{self.capacity // MIB} MB (DECODE_BUDGET_MB); send a smaller image or a JPEG",
                code=ErrorCode.INVALID_IMAGE,
            )
        deadline = time.monotonic() + self.wait_seconds
        with self.changed:
            while self.free < cost:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(
                        "too many large photos are being decoded right now; retry shortly",
                        retry_after=self.wait_seconds,
                    )
                self.changed.wait(remaining)
            self.free -= cost
        try:
            yield
        finally:
            with self.changed:
                self.free += cost
                self.changed.notify_all()
            if cost >= TRIM_AFTER_BYTES:
                release_memory()


@functools.cache
def c_library() -> ctypes.CDLL | None:
    """The C library, when it is glibc (whose ``malloc_trim`` returns freed memory)."""
    try:
        library = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return library if hasattr(library, "malloc_trim") else None


def release_memory() -> None:
    """Give freed heap pages back to the operating system after a large decode."""
    library = c_library()
    if library is not None:
        library.malloc_trim(0)
