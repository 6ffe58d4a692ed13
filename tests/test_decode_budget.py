"""The decode budget: an image's cost priced from its header, held while it decodes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from decode_budget import MIB, PEAK_BYTES_PER_PIXEL, PEAK_BYTES_WEBP, DecodeBudget, decode_cost
from errors import BadRequest, Overloaded


def opened(mode: str, size: tuple[int, int], image_format: str) -> Image.Image:
    """An image of the mode and size, saved in the format and opened lazily again."""
    output = io.BytesIO()
    Image.new(mode, size).save(output, format=image_format)
    return Image.open(io.BytesIO(output.getvalue()))


def test_the_cost_is_priced_from_the_mode_and_format_before_decoding() -> None:
    assert decode_cost(opened("RGB", (100, 50), "JPEG")) == 100 * 50 * PEAK_BYTES_PER_PIXEL["RGB"]
    assert decode_cost(opened("RGB", (100, 50), "WEBP")) == 100 * 50 * PEAK_BYTES_WEBP


def test_a_cost_beyond_the_whole_budget_is_an_invalid_image() -> None:
    with pytest.raises(BadRequest) as raised, DecodeBudget(16, 0.0).reserve(17 * MIB):
        pass

    assert raised.value.code == "invalid_image"


def test_a_cost_that_does_not_fit_beside_another_is_overloaded_when_the_wait_runs_out() -> None:
    budget = DecodeBudget(16, 0.0)
    with budget.reserve(10 * MIB), pytest.raises(Overloaded), budget.reserve(10 * MIB):
        pass


def test_the_cost_is_given_back_after_the_decode() -> None:
    budget = DecodeBudget(16, 0.0)
    with budget.reserve(10 * MIB):
        assert budget.free == 6 * MIB
    with budget.reserve(16 * MIB):
        assert budget.free == 0
    assert budget.free == budget.capacity
