"""JSON read from outside the service: the model's answers, stored records, settings.

``parse_json`` is ``json.loads`` that reports absurd nesting as the ``ValueError`` any other bad
JSON is, so every caller catches one exception.
"""

from __future__ import annotations

import json
from typing import Any


def parse_json(data: bytes | str) -> Any:
    """JSON, with absurd nesting reported as the ValueError any other bad JSON is."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
