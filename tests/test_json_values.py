"""parse_json: JSON read from outside, every bad input one ValueError."""

from __future__ import annotations

import pytest

from json_values import parse_json


def test_parse_json_reads_bytes_and_text_alike() -> None:
    assert parse_json(b'{"a": [1, 2.5]}') == parse_json('{"a": [1, 2.5]}') == {"a": [1, 2.5]}


def test_absurd_nesting_is_the_value_error_any_bad_json_is() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000)
