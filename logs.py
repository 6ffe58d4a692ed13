"""Log lines that stay one line and never show a secret.

``RequestContextFilter`` stamps each record with the request id it is told, escapes control
characters and Unicode line breaks, shortens long messages and ``redact``s configured secrets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

# Log lines stay single lines (a caller's path or an upstream message cannot start a forged one):
# the C0 and C1 controls, DEL, and the two Unicode separators are each written as an escape, so
# no reader that honours a Unicode line break (NEL, U+2028, U+2029) sees one either.
CONTROL_CHARACTERS = {
    **{code: f"\\x{code:02x}" for code in (*range(32), *range(127, 160))},
    **{code: f"\\u{code:04x}" for code in (0x2028, 0x2029)},
}
MAX_LOG_MESSAGE = 1000
MIN_SECRET_FRAGMENT = 4


class RequestContextFilter(logging.Filter):
    """Stamps each record with the request id and blanks out any configured secret.

    ``request_id`` tells the current request's id ('-' outside one), so the filter needs no web
    framework of its own.
    """

    def __init__(self, request_id: Callable[[], str]) -> None:
        super().__init__()
        self.request_id = request_id
        self.secrets: tuple[str, ...] = ()

    def redact_also(self, *secrets: str | None) -> None:
        """Add an app's secrets to those blanked out (every app's, so none is ever exposed)."""
        found = (secret for secret in secrets if secret and len(secret) >= MIN_SECRET_FRAGMENT)
        self.secrets = tuple(dict.fromkeys((*self.secrets, *found)))

    def filter(self, record: logging.LogRecord) -> bool:
        """Add ``request_id``; keep the message one line, short, and free of secrets."""
        record.request_id = self.request_id()
        message = record.getMessage()
        cleaned = message.translate(CONTROL_CHARACTERS)
        if len(cleaned) > MAX_LOG_MESSAGE:
            cleaned = cleaned[:MAX_LOG_MESSAGE] + "…"
        cleaned = redact(cleaned, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """The text with every secret, and the start of one cut off at its end, blanked out."""
    for secret in secrets:
        if len(secret) >= MIN_SECRET_FRAGMENT:
            text = redact_cut_secret(text.replace(secret, "[redacted]"), secret)
    return text


def redact_cut_secret(text: str, secret: str) -> str:
    """Redact the start of a secret left at the end of a shortened line."""
    for length in range(min(len(secret), len(text)) - 1, MIN_SECRET_FRAGMENT - 1, -1):
        if text.endswith(secret[:length]) or text.endswith(secret[:length] + "…"):
            return text[: text.rfind(secret[:length])] + "[redacted]"
    return text
