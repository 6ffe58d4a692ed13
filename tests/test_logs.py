"""Log lines: one line each, the request id stamped, configured secrets blanked out."""

from __future__ import annotations

import logging

from logs import MAX_LOG_MESSAGE, RequestContextFilter, redact


def filtered(message: str, *secrets: str) -> logging.LogRecord:
    """A record of the message after the filter, told the request id req-1."""
    log_filter = RequestContextFilter(lambda: "req-1")
    log_filter.redact_also(*secrets)
    record = logging.LogRecord("image_service", logging.INFO, __file__, 1, message, None, None)
    log_filter.filter(record)
    return record


def test_the_filter_stamps_the_request_id_it_is_told() -> None:
    assert filtered("hello").request_id == "req-1"


def test_line_breaks_of_every_kind_are_escaped() -> None:
    message = filtered("a\nb\rc\x85d\u2028e").getMessage()

    assert message == "a\\x0ab\\x0dc\\x85d\\u2028e"


def test_a_secret_cut_off_at_the_end_of_a_shortened_line_is_still_redacted() -> None:
    secret = "sk-0123456789abcdef"
    message = filtered("x" * (MAX_LOG_MESSAGE - 6) + secret, secret).getMessage()

    assert "sk-012" not in message
    assert message.endswith("[redacted]")


def test_redact_ignores_secrets_too_short_to_be_told_apart_from_words() -> None:
    assert redact("abc and abcdef", ("abc", "abcdef")) == "abc and [redacted]"
