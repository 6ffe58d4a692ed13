"""Image preparation: prepare_image, which requests run, as a unit and as callers see it."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
from flask.testing import FlaskClient
from PIL import Image
from werkzeug.test import TestResponse

from app import BadRequest, PreparedImage, prepare_image
from decode_budget import DecodeBudget
from tests import images
from tests.conftest import cached_keys
from tests.fakes import ChatCompletionsServer, RedisServer

MAX_SIDE = 1024
MAX_PIXELS = 60_000_000
WHITE_ENOUGH = 245  # JPEG may shift pure white by a few levels
DECODE_BUDGET_MB = 768


def prepare(data: bytes, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS) -> PreparedImage:
    """prepare_image with the service's default limits and decode budget."""
    return prepare_image(data, max_side, max_pixels, DecodeBudget(DECODE_BUDGET_MB, 0.0))


def decoded(prepared: PreparedImage) -> Image.Image:
    """The prepared JPEG, opened and loaded."""
    image = Image.open(io.BytesIO(prepared.jpeg))
    image.load()
    return image


def is_white(pixel: tuple[int, ...]) -> bool:
    """Whether an RGB pixel is white, give or take JPEG's rounding."""
    return all(channel >= WHITE_ENOUGH for channel in pixel[:3])


def is_red(pixel: tuple[int, ...]) -> bool:
    """Whether an RGB pixel is clearly red."""
    red, green, blue = pixel[:3]
    return red > 200 and green < 60 and blue < 60


def is_blue(pixel: tuple[int, ...]) -> bool:
    """Whether an RGB pixel is clearly blue."""
    red, green, blue = pixel[:3]
    return blue > 200 and red < 60 and green < 60


def rejection_code(data: bytes, **limits: int) -> str:
    """The code of the BadRequest prepare_image raises for this upload."""
    with pytest.raises(BadRequest) as raised:
        prepare(data, **limits)
    return raised.value.code


# ---------------------------------------------------------------------------- accepted formats


@pytest.mark.parametrize(
    ("make", "source_format"),
    [
        (images.jpeg, "JPEG"),
        (images.png, "PNG"),
        (images.webp, "WEBP"),
        (images.gif, "GIF"),
        (images.cmyk_jpeg, "JPEG"),
    ],
    ids=["jpeg", "png", "webp", "gif", "cmyk-jpeg"],
)
def test_accepted_format_becomes_an_rgb_jpeg(make: Callable[[], bytes], source_format: str) -> None:
    prepared = prepare(make())

    image = decoded(prepared)
    assert prepared.source_format == source_format
    assert image.format == "JPEG"
    assert image.mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [
        images.jpeg(),
        images.png(mode="RGBA", transparent=True),
        images.webp(mode="RGBA"),
        images.gif(frames=3),
        images.cmyk_jpeg(),
        images.png(mode="I;16"),
    ],
    ids=["jpeg", "rgba-png", "rgba-webp", "animated-gif", "cmyk-jpeg", "16-bit-png"],
)
def test_output_is_a_baseline_jpeg(data: bytes) -> None:
    image = decoded(prepare(data))

    assert image.format == "JPEG"
    assert not image.info.get("progressive")
    assert not image.info.get("progression")


def test_prepared_size_matches_the_jpeg() -> None:
    prepared = prepare(images.jpeg(640, 480))

    assert decoded(prepared).size == (prepared.width, prepared.height) == (640, 480)


def test_animated_gif_sends_its_first_frame() -> None:
    data = images.gif(320, 240, frames=3)  # frame 1 red, frame 2 green, frame 3 blue
    with Image.open(io.BytesIO(data)) as source:
        assert source.n_frames == 3

    image = decoded(prepare(data))

    red, green, blue = image.getpixel((5, 235))  # bottom rows carry the frame's full colour
    assert red > 150
    assert red > 3 * green
    assert red > 3 * blue


def test_cmyk_jpeg_keeps_its_colours() -> None:
    image = decoded(prepare(images.cmyk_jpeg(320, 240)))

    red, green, blue = image.getpixel((160, 120))  # the green ellipse in the middle
    assert green > red + 60
    assert green > blue + 60


def test_16_bit_png_is_scaled_to_8_bit() -> None:
    image = decoded(prepare(images.png(320, 240, mode="I;16")))

    low, high = image.convert("L").getextrema()
    assert low < 30  # the dark top of the gradient stays dark
    assert 60 < high < 250  # the bright end is neither clipped to white nor crushed to black


def test_la_png_is_accepted() -> None:
    image = decoded(prepare(images.png(320, 240, mode="LA")))

    assert image.mode == "RGB"
    assert image.size == (320, 240)


# ---------------------------------------------------------------------------- transparency


@pytest.mark.parametrize(
    "data",
    [
        images.png(320, 240, mode="P", transparent=True),
        images.png(320, 240, mode="RGBA", transparent=True),
        images.png(320, 240, mode="LA", transparent=True),
        images.webp(320, 240, mode="RGBA"),
    ],
    ids=["palette-png", "rgba-png", "la-png", "rgba-webp"],
)
def test_transparent_areas_become_white(data: bytes) -> None:
    image = decoded(prepare(data))

    assert is_white(image.getpixel((0, 0)))
    assert is_white(image.getpixel((319, 239)))


@pytest.mark.parametrize(
    "data",
    [
        images.png(320, 240, mode="P", transparent=True),
        images.png(320, 240, mode="RGBA", transparent=True),
        images.webp(320, 240, mode="RGBA"),
    ],
    ids=["palette-png", "rgba-png", "rgba-webp"],
)
def test_opaque_areas_keep_their_colour(data: bytes) -> None:
    image = decoded(prepare(data))

    red, green, blue = image.getpixel((160, 120))  # the opaque green ellipse
    assert green > red + 60
    assert green > blue + 60


def test_colour_keyed_rgb_png_transparency_becomes_white() -> None:
    image = decoded(prepare(images.png(320, 240, mode="RGB", transparent=True)))

    assert is_white(image.getpixel((0, 0)))


# ---------------------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    ("orientation", "size", "first", "second"),
    [
        (3, (400, 200), "blue", "red"),
        (6, (200, 400), "red", "blue"),
        (8, (200, 400), "blue", "red"),
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], first: str, second: str
) -> None:
    image = decoded(prepare(images.orientation_probe_jpeg(orientation)))
    width, height = image.size
    # "first" is the left half of a landscape result, the top half of a portrait one.
    if width > height:
        first_pixel, second_pixel = image.getpixel((50, 100)), image.getpixel((350, 100))
    else:
        first_pixel, second_pixel = image.getpixel((100, 50)), image.getpixel((100, 350))
    colour = {"red": is_red, "blue": is_blue}

    assert image.size == size
    assert colour[first](first_pixel)
    assert colour[second](second_pixel)


def test_orientation_tag_is_gone_after_rotation() -> None:
    prepared = prepare(images.orientation_probe_jpeg(6))

    assert "Orientation" not in images.exif_of(prepared.jpeg)


# ---------------------------------------------------------------------------- size


def test_long_side_is_shrunk_to_max_side_keeping_the_aspect() -> None:
    image = decoded(prepare(images.png(2000, 1500), max_side=1024))

    assert image.size == (1024, 768)


def test_jpeg_decoded_at_a_reduced_scale_near_max_side_is_not_resized_again() -> None:
    image = decoded(prepare(images.jpeg(2000, 1500), max_side=1024))

    assert image.size == (1000, 750)


def test_jpeg_whose_reduced_scale_falls_short_of_max_side_is_resized_to_it() -> None:
    image = decoded(prepare(images.jpeg(1600, 1200), max_side=1024))

    assert image.size == (1024, 768)


def test_portrait_long_side_is_shrunk_to_max_side() -> None:
    image = decoded(prepare(images.png(600, 1200), max_side=300))

    assert image.size == (150, 300)


def test_small_image_is_never_enlarged() -> None:
    image = decoded(prepare(images.jpeg(300, 200)))

    assert image.size == (300, 200)


def test_one_by_one_image_is_accepted() -> None:
    image = decoded(prepare(images.png(1, 1)))

    assert image.size == (1, 1)


@pytest.mark.parametrize("make", [images.png, images.jpeg], ids=["png", "jpeg"])
def test_long_thin_strip_is_accepted(make: Callable[[int, int], bytes]) -> None:
    image = decoded(prepare(make(20_000, 20)))

    assert max(image.size) <= MAX_SIDE
    assert min(image.size) >= 1


def test_max_pixels_is_respected() -> None:
    assert rejection_code(images.jpeg(2000, 1000), max_pixels=1_999_999) == "invalid_image"


def test_image_at_max_pixels_is_accepted() -> None:
    image = decoded(prepare(images.png(2000, 1000), max_pixels=2_000_000))

    assert image.size == (1024, 512)


# ---------------------------------------------------------------------------- metadata


def test_gps_camera_serial_and_orientation_are_removed() -> None:
    data = images.jpeg(640, 480, orientation=6, gps=True, exif_extra=True)
    assert images.has_any_metadata(data)

    prepared = prepare(data)

    assert not images.has_any_metadata(prepared.jpeg)
    assert images.exif_of(prepared.jpeg) == {}
    assert images.CAMERA_SERIAL.encode() not in prepared.jpeg


def test_huge_icc_profile_is_removed() -> None:
    data = images.jpeg_with_huge_icc()

    prepared = prepare(data)

    assert not images.has_any_metadata(prepared.jpeg)
    assert len(prepared.jpeg) < 100_000


def test_data_appended_after_a_jpeg_is_dropped() -> None:
    prepared = prepare(images.jpeg_followed_by_zip())

    assert decoded(prepared).size == (160, 120)
    assert b"PK\x03\x04" not in prepared.jpeg
    assert b"hidden payload" not in prepared.jpeg


# ---------------------------------------------------------------------------- rejected input


@pytest.mark.parametrize("make", [images.bmp, images.tiff], ids=["bmp", "tiff"])
def test_other_real_formats_are_unsupported(make: Callable[[], bytes]) -> None:
    assert rejection_code(make()) == "unsupported_image_type"


def test_unsupported_format_is_named_in_the_message() -> None:
    with pytest.raises(BadRequest) as raised:
        prepare(images.bmp())

    assert "BMP" in raised.value.message
    assert raised.value.status == 400


def test_text_is_an_invalid_image() -> None:
    assert rejection_code(images.text_bytes()) == "invalid_image"


def test_truncated_jpeg_is_an_invalid_image() -> None:
    assert rejection_code(images.truncated_jpeg()) == "invalid_image"


def test_png_claiming_50000_by_50000_is_an_invalid_image() -> None:
    assert rejection_code(images.png_with_huge_dimensions_header()) == "invalid_image"


def test_png_claiming_more_than_max_pixels_is_refused_from_its_header() -> None:
    # 8000x8000 is below Pillow's own bomb limit: only the max_pixels check can refuse it,
    # and the file holds a single scanline, so decoding it would fail differently.
    data = images.png_with_huge_dimensions_header(8_000, 8_000)

    with pytest.raises(BadRequest) as raised:
        prepare(data)

    assert raised.value.code == "invalid_image"
    assert "8000x8000" in raised.value.message


# ---------------------------------------------------------------------------- through HTTP


def upload(
    client: FlaskClient, headers: dict[str, str], data: bytes, filename: str = "meal.jpg"
) -> TestResponse:
    """POST these bytes as the image part of /analyze-food."""
    return client.post(
        "/analyze-food", data={"image": (io.BytesIO(data), filename)}, headers=headers
    )


def assert_refused(
    response: TestResponse,
    code: str,
    model: ChatCompletionsServer,
    redis: RedisServer,
) -> None:
    """A 400 JSON error with this code, without asking the model or caching anything."""
    assert response.status_code == 400
    assert response.mimetype == "application/json"
    assert response.get_json()["code"] == code
    assert model.calls == []
    assert cached_keys(redis) == []


def test_model_receives_an_upright_bare_jpeg_within_max_side(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    data = images.jpeg(4032, 3024, orientation=6, gps=True, exif_extra=True)

    response = upload(client, auth_headers, data)

    sent = model.last_image_bytes()
    with Image.open(io.BytesIO(sent)) as image:
        assert image.format == "JPEG"
        assert image.size == (756, 1008)
    assert response.status_code == 200
    assert not images.has_any_metadata(sent)
    assert images.exif_of(sent) == {}


def test_orientation_is_applied_to_what_the_model_sees(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    upload(client, auth_headers, images.orientation_probe_jpeg(6))

    with Image.open(io.BytesIO(model.last_image_bytes())) as image:
        assert image.size == (200, 400)
        assert is_red(image.convert("RGB").getpixel((100, 50)))
        assert is_blue(image.convert("RGB").getpixel((100, 350)))


@pytest.mark.parametrize(
    ("make", "filename"),
    [(images.png, "meal.png"), (images.webp, "meal.webp"), (images.gif, "meal.gif")],
    ids=["png", "webp", "gif"],
)
def test_other_accepted_formats_are_analysed(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    make: Callable[[], bytes],
    filename: str,
) -> None:
    response = upload(client, auth_headers, make(), filename)

    assert response.status_code == 200
    assert model.last_image_bytes()[:2] == b"\xff\xd8"


def test_jpeg_followed_by_zip_is_analysed(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    response = upload(client, auth_headers, images.jpeg_followed_by_zip())

    assert response.status_code == 200
    assert b"PK\x03\x04" not in model.last_image_bytes()


@pytest.mark.parametrize(
    ("make", "filename"),
    [(images.bmp, "meal.bmp"), (images.tiff, "meal.tiff")],
    ids=["bmp", "tiff"],
)
def test_unsupported_format_answers_400(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    redis: RedisServer,
    make: Callable[[], bytes],
    filename: str,
) -> None:
    response = upload(client, auth_headers, make(), filename)

    assert_refused(response, "unsupported_image_type", model, redis)


@pytest.mark.parametrize(
    "make",
    [images.text_bytes, images.truncated_jpeg, images.png_with_huge_dimensions_header],
    ids=["text", "truncated-jpeg", "huge-header-png"],
)
def test_undecodable_upload_answers_400(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    redis: RedisServer,
    make: Callable[[], bytes],
) -> None:
    response = upload(client, auth_headers, make())

    assert_refused(response, "invalid_image", model, redis)


def test_empty_image_part_answers_empty_image(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    redis: RedisServer,
) -> None:
    response = upload(client, auth_headers, b"")

    assert_refused(response, "empty_image", model, redis)


def test_form_without_an_image_part_answers_missing_image(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    redis: RedisServer,
) -> None:
    response = client.post(
        "/analyze-food",
        data={"photo": (io.BytesIO(images.jpeg()), "meal.jpg")},
        headers=auth_headers,
    )

    assert_refused(response, "missing_image", model, redis)


def test_text_field_named_image_answers_missing_image(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    redis: RedisServer,
) -> None:
    response = client.post(
        "/analyze-food",
        data={"image": "a photo of my lunch"},
        headers=auth_headers,
        content_type="multipart/form-data",
    )

    assert_refused(response, "missing_image", model, redis)


def test_raw_jpeg_body_answers_missing_image(
    client: FlaskClient,
    auth_headers: dict[str, str],
    model: ChatCompletionsServer,
    redis: RedisServer,
) -> None:
    response = client.post(
        "/analyze-food",
        data=images.jpeg(),
        headers={**auth_headers, "Content-Type": "image/jpeg"},
    )

    assert_refused(response, "missing_image", model, redis)
