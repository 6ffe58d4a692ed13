"""Hostile uploads and request bodies: each answers the contract's JSON 4xx or a 200, never 5xx.

The Flask test client walks the whole list once; the real gunicorn shows what only a socket can:
a 413 before an announced body arrives, a 64 KB header, thousands of form parts on the wire,
chunked bodies framed wrong.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pillow_heif
import pytest
from flask.testing import FlaskClient
from PIL import Image, ImageDraw
from werkzeug.datastructures import MultiDict
from werkzeug.test import TestResponse

from app import (
    MAX_FORM_FIELD_BYTES,
    MAX_FORM_PARTS,
    BadRequest,
    Config,
    create_app,
    prepare_image,
)
from decode_budget import DecodeBudget
from tests import images
from tests.conftest import (
    JWT_SECRET,
    assert_json_error,
    base_environment,
    bearer,
    running_gunicorn,
)
from tests.fakes import ChatCompletionsServer, RedisServer, UserServiceServer
from tests.servers import Gunicorn

MIB = 1024 * 1024
SOCKET_TIMEOUT = 10.0  # seconds to wait for an answer over the socket; never a duration check
MAX_UPLOAD_BYTES = Config().max_upload_bytes  # MAX_UPLOAD_MB's default, 25
MEAL = images.jpeg(64, 48)
HEIC_COLOUR = (200, 100, 50)
HUGE_EXIF_MARKER = b"MAKERNOTE-PAYLOAD"

Answer = tuple[int, str | None]  # status and error code (None on success)


# ---------------------------------------------------------------------------- generated inputs


def heic(width: int = 640, height: int = 480) -> bytes:
    """A HEIC (HEVC in HEIF), as an iPhone writes: a flat colour with one darker ellipse."""
    image = Image.new("RGB", (width, height), HEIC_COLOUR)
    ImageDraw.Draw(image).ellipse(
        (width * 3 // 8, height * 3 // 8, width * 5 // 8, height * 5 // 8), fill=(100, 50, 25)
    )
    buffer = io.BytesIO()
    pillow_heif.from_pillow(image).save(buffer, format="HEIF", quality=90)
    return buffer.getvalue()


def heic_with_header_size(width: int, height: int) -> bytes:
    """A 640x480 HEIC whose `ispe` box (the size its header declares) says width x height."""
    data = heic()
    box = data.find(b"ispe")
    assert box > 0, "the HEIC has no ispe box"
    # 'ispe', then version and flags (4 bytes), then width and height (4 bytes each).
    return data[: box + 8] + struct.pack(">II", width, height) + data[box + 16 :]


def heic_with_corrupt_coded_data() -> bytes:
    """A HEIC whose first HEVC unit claims 4 GB: the header opens, decoding the pixels fails."""
    data = heic()
    payload = data.find(b"mdat") + 4  # the first NAL unit's 4-byte length comes first
    return data[:payload] + b"\xff\xff\xff\xff" + data[payload + 4 :]


def truncated_heic() -> bytes:
    """The first half of a HEIC: its header is whole, its coded pixels are not."""
    data = heic()
    return data[: len(data) // 2]


def heic_cut_inside_its_header() -> bytes:
    """A HEIC that stops inside its `meta` box: the brand says HEIC, nothing more can be read."""
    data = heic()
    return data[: data.find(b"meta") + 64]


def jpeg_with_huge_exif(size: int = 60_000) -> bytes:
    """A small JPEG whose EXIF block is close to the 64 KB an APP1 segment can hold."""
    exif = Image.Exif()
    maker_note = HUGE_EXIF_MARKER + b"M" * (size - len(HUGE_EXIF_MARKER))
    exif.get_ifd(images.EXIF_IFD_TAG)[0x927C] = maker_note  # MakerNote
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 140, 60)).save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def image_part(data: bytes) -> tuple[io.BytesIO, str, str]:
    """A file part labelled as a JPEG whatever it holds: the label must not be trusted."""
    return (io.BytesIO(data), "meal.jpg", "image/jpeg")


def many_fields(count: int) -> MultiDict[str, Any]:
    """A form with the photo and `count` short text fields."""
    form: MultiDict[str, Any] = MultiDict([("image", image_part(MEAL))])
    for index in range(count):
        form.add(f"field{index}", "x")
    return form


def multipart_cut_short() -> bytes:
    """A multipart body that stops inside the image part, before any closing boundary."""
    head = (
        b"--cut\r\n"
        b'Content-Disposition: form-data; name="image"; filename="meal.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    )
    return head + MEAL[: len(MEAL) // 2]


# ---------------------------------------------------------------------------- the hostile list

RequestOptions = Callable[[], dict[str, Any]]


def upload_of(make: Callable[[], bytes]) -> RequestOptions:
    """A multipart POST whose one image part holds these bytes."""
    return lambda: {"method": "POST", "data": {"image": image_part(make())}}


HOSTILE_REQUESTS: dict[str, tuple[RequestOptions, Answer]] = {
    # images
    "zero-bytes": (upload_of(lambda: b""), (400, "empty_image")),
    "text-as-image-jpeg": (upload_of(images.text_bytes), (400, "invalid_image")),
    "truncated-jpeg": (upload_of(images.truncated_jpeg), (400, "invalid_image")),
    "png-claiming-50000x50000": (
        upload_of(images.png_with_huge_dimensions_header),
        (400, "invalid_image"),
    ),
    "1x1-png": (upload_of(lambda: images.png(1, 1)), (200, None)),
    "20000x20-strip": (upload_of(lambda: images.png(20_000, 20)), (200, None)),
    "animated-gif": (upload_of(lambda: images.gif(frames=3)), (200, None)),
    "cmyk-jpeg": (upload_of(images.cmyk_jpeg), (200, None)),
    "16-bit-png": (upload_of(lambda: images.png(mode="I;16")), (200, None)),
    "palette-png-with-transparency": (
        upload_of(lambda: images.png(mode="P", transparent=True)),
        (200, None),
    ),
    "rgba-webp": (upload_of(lambda: images.webp(mode="RGBA")), (200, None)),
    "exif-rotated-jpeg": (upload_of(lambda: images.jpeg(orientation=6)), (200, None)),
    "jpeg-with-huge-exif": (upload_of(jpeg_with_huge_exif), (200, None)),
    "jpeg-with-huge-icc": (upload_of(images.jpeg_with_huge_icc), (200, None)),
    "jpeg-followed-by-zip": (upload_of(images.jpeg_followed_by_zip), (200, None)),
    "heic": (upload_of(heic), (200, None)),
    "truncated-heic": (upload_of(truncated_heic), (400, "invalid_image")),
    "heic-cut-inside-its-header": (upload_of(heic_cut_inside_its_header), (400, "invalid_image")),
    "heic-with-corrupt-coded-data": (
        upload_of(heic_with_corrupt_coded_data),
        (400, "invalid_image"),
    ),
    "heic-header-understating-its-size": (
        upload_of(lambda: heic_with_header_size(320, 240)),
        (400, "invalid_image"),
    ),
    "heic-claiming-50000x50000": (
        upload_of(lambda: heic_with_header_size(50_000, 50_000)),
        (400, "invalid_image"),
    ),
    # request shapes
    "raw-jpeg-body": (
        lambda: {"method": "POST", "data": MEAL, "content_type": "image/jpeg"},
        (400, "missing_image"),
    ),
    "more-image-parts-than-max-images": (
        lambda: {"method": "POST", "data": {"image": [image_part(MEAL) for _ in range(6)]}},
        (400, "too_many_images"),
    ),
    "huge-text-field": (
        lambda: {
            "method": "POST",
            "data": {"image": image_part(MEAL), "comment": "x" * (MAX_FORM_FIELD_BYTES + 1)},
        },
        (413, "payload_too_large"),
    ),
    "thousands-of-form-parts": (
        lambda: {"method": "POST", "data": many_fields(3000)},
        (413, "payload_too_large"),
    ),
    "body-over-max-upload-mb": (
        lambda: {"method": "POST", "data": {"image": image_part(b"\xff" * (MAX_UPLOAD_BYTES + 1))}},
        (413, "payload_too_large"),
    ),
    "multipart-without-boundary": (
        lambda: {"method": "POST", "data": b"--x\r\n\r\n", "content_type": "multipart/form-data"},
        (400, "missing_image"),
    ),
    "multipart-cut-short": (
        lambda: {
            "method": "POST",
            "data": multipart_cut_short(),
            "content_type": "multipart/form-data; boundary=cut",
        },
        (400, "missing_image"),
    ),
    "urlencoded-thousands-of-fields": (
        lambda: {
            "method": "POST",
            "data": "&".join(f"field{index}=1" for index in range(5000)),
            "content_type": "application/x-www-form-urlencoded",
        },
        (400, "missing_image"),
    ),
    "get-on-analyze-food": (lambda: {"method": "GET"}, (405, "method_not_allowed")),
}


@dataclasses.dataclass(frozen=True)
class Walked:
    """What one hostile request got back."""

    status: int
    mimetype: str
    body: Any


@pytest.fixture(scope="module")
def walked(
    model_server: ChatCompletionsServer,
    user_service_server: UserServiceServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Walked]:
    """Send every hostile request once to an app with the default limits (in-memory cache)."""
    model_server.reset()
    user_service_server.reset()
    secrets_dir = tmp_path_factory.mktemp("hostile-no-secrets")
    config = Config.from_env(base_environment(None, model_server, user_service_server), secrets_dir)
    flask_app = create_app(config)
    flask_app.testing = True
    client = flask_app.test_client()
    now = int(time.time())
    token = jwt.encode({"sub": "user-42", "exp": now + 600}, JWT_SECRET, algorithm="HS256")
    answers: dict[str, Walked] = {}
    for name, (options, _) in HOSTILE_REQUESTS.items():
        response = client.open(
            "/analyze-food", headers={"Authorization": f"Bearer {token}"}, **options()
        )
        answers[name] = Walked(
            response.status_code, response.mimetype, response.get_json(silent=True)
        )
    return answers


def test_no_hostile_request_gets_a_5xx(walked: dict[str, Walked]) -> None:
    server_errors = {name: answer.body for name, answer in walked.items() if answer.status >= 500}

    assert server_errors == {}


def test_every_hostile_request_gets_json(walked: dict[str, Walked]) -> None:
    not_json = {
        name: answer.mimetype
        for name, answer in walked.items()
        if answer.mimetype != "application/json" or not isinstance(answer.body, dict)
    }

    assert not_json == {}


def test_every_refusal_carries_an_error_and_a_code(walked: dict[str, Walked]) -> None:
    incomplete = {
        name: answer.body
        for name, answer in walked.items()
        if answer.status != 200
        and not (
            isinstance(answer.body, dict)
            and isinstance(answer.body.get("error"), str)
            and answer.body["error"]
            and isinstance(answer.body.get("code"), str)
        )
    }

    assert incomplete == {}


def test_each_hostile_request_gets_its_contract_answer(walked: dict[str, Walked]) -> None:
    def answer_of(walked_answer: Walked) -> Answer:
        body = walked_answer.body if isinstance(walked_answer.body, dict) else {}
        return walked_answer.status, body.get("code")

    got = {name: answer_of(answer) for name, answer in walked.items()}
    expected = {name: answer for name, (_, answer) in HOSTILE_REQUESTS.items()}

    assert got == expected


# ---------------------------------------------------------------------------- images in depth


def post(client: FlaskClient, headers: dict[str, str], data: Any) -> TestResponse:
    """POST a multipart form to /analyze-food."""
    return client.post("/analyze-food", data=data, headers=headers)


def test_heic_reaches_the_model_as_a_shrunk_jpeg(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    response = post(client, auth_headers, {"image": (io.BytesIO(heic(1200, 900)), "IMG_0001.HEIC")})

    assert response.status_code == 200
    with Image.open(io.BytesIO(model.last_image_bytes())) as sent:
        assert sent.format == "JPEG"
        assert sent.size == (1024, 768)


def test_heic_keeps_its_colours(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    post(client, auth_headers, {"image": (io.BytesIO(heic()), "IMG_0001.HEIC")})

    with Image.open(io.BytesIO(model.last_image_bytes())) as sent:
        corner = sent.convert("RGB").getpixel((10, 10))
    assert all(abs(got - want) <= 12 for got, want in zip(corner, HEIC_COLOUR, strict=True))


def test_heic_claiming_50000x50000_is_refused_before_the_model(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    data = heic_with_header_size(50_000, 50_000)

    response = post(client, auth_headers, {"image": image_part(data)})

    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_image"
    assert model.calls == []


@pytest.mark.parametrize(
    "make",
    [heic_with_corrupt_coded_data, lambda: heic_with_header_size(320, 240)],
    ids=["corrupt-coded-data", "header-understating-its-size"],
)
def test_heic_that_fails_to_decode_is_an_invalid_image(make: Callable[[], bytes]) -> None:
    with pytest.raises(BadRequest) as raised:
        prepare_image(make(), 1024, 60_000_000, DecodeBudget(768, 0.0))

    assert raised.value.code == "invalid_image"


def test_heic_cut_inside_its_header_is_an_invalid_image_not_an_unsupported_one() -> None:
    with pytest.raises(BadRequest) as raised:
        prepare_image(heic_cut_inside_its_header(), 1024, 60_000_000, DecodeBudget(768, 0.0))

    assert raised.value.code == "invalid_image"


def test_huge_exif_block_never_reaches_the_model(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    data = jpeg_with_huge_exif()
    assert HUGE_EXIF_MARKER in data

    response = post(client, auth_headers, {"image": image_part(data)})

    assert response.status_code == 200
    sent = model.last_image_bytes()
    assert HUGE_EXIF_MARKER not in sent
    assert not images.has_any_metadata(sent)


# ---------------------------------------------------------------------------- form limits


def test_six_image_parts_never_reach_the_model(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    photos = [images.jpeg(64, 48, color=(10, 40 * shade, 10)) for shade in range(6)]

    response = post(client, auth_headers, {"image": [image_part(photo) for photo in photos]})

    assert_json_error(response, 400, "too_many_images")
    assert "at most 5 photos" in response.get_json()["error"]
    assert model.calls == []


def test_text_field_over_the_limit_names_the_form_limits(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    form = {"image": image_part(MEAL), "comment": "x" * (MAX_FORM_FIELD_BYTES + 1)}

    message = post(client, auth_headers, form).get_json()["error"]

    assert f"{MAX_FORM_PARTS} parts" in message
    assert f"{MAX_FORM_FIELD_BYTES // 1024} KiB" in message


def test_text_field_just_under_the_limit_is_accepted(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    form = {"image": image_part(MEAL), "comment": "x" * (MAX_FORM_FIELD_BYTES - 1024)}

    response = post(client, auth_headers, form)

    assert response.status_code == 200


def test_form_of_exactly_max_form_parts_is_accepted(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    response = post(client, auth_headers, many_fields(MAX_FORM_PARTS - 1))

    assert response.status_code == 200


def test_form_one_part_over_max_form_parts_answers_413(
    client: FlaskClient, auth_headers: dict[str, str], model: ChatCompletionsServer
) -> None:
    response = post(client, auth_headers, many_fields(MAX_FORM_PARTS))

    assert response.status_code == 413
    assert response.get_json()["code"] == "payload_too_large"
    assert model.calls == []


def test_body_over_max_upload_names_the_size_limit(
    client: FlaskClient, auth_headers: dict[str, str]
) -> None:
    form = {"image": image_part(b"\xff" * (MAX_UPLOAD_BYTES + 1))}

    message = post(client, auth_headers, form).get_json()["error"]

    assert "larger than 25 MB" in message


# ---------------------------------------------------------------------------- /nutrition's body

NUTRITION_ITEMS = {"items": [{"ndbNo": "15237", "grams": 150}]}


@pytest.fixture
def counting(client_with: Callable[..., FlaskClient], sr28_dir: Path) -> FlaskClient:
    """A client for an app that counts POST /nutrition from the SR28 table."""
    return client_with(nutrition_source="usda-sr28")


def nested_json(depth: int) -> str:
    """A /nutrition body whose items hold lists nested this deep."""
    return '{"items": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_json_nested_thousands_deep_answers_400(
    counting: FlaskClient, auth_headers: dict[str, str], depth: int
) -> None:
    response = counting.post(
        "/nutrition", data=nested_json(depth), content_type="application/json", headers=auth_headers
    )

    assert_json_error(response, 400, "bad_request")


def test_json_nested_500_deep_answers_400(
    counting: FlaskClient, auth_headers: dict[str, str]
) -> None:
    response = counting.post(
        "/nutrition", data=nested_json(500), content_type="application/json", headers=auth_headers
    )

    assert_json_error(response, 400, "invalid_parameter")


def test_a_body_that_is_not_json_answers_400_bad_request(
    counting: FlaskClient, auth_headers: dict[str, str]
) -> None:
    response = counting.post(
        "/nutrition", data='{"items": [', content_type="application/json", headers=auth_headers
    )

    assert_json_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    "options",
    [
        {"data": json.dumps(NUTRITION_ITEMS), "content_type": "text/plain"},
        {"data": json.dumps(NUTRITION_ITEMS)},
        {"data": {"items": json.dumps(NUTRITION_ITEMS["items"])}},
        {
            "data": {"items": json.dumps(NUTRITION_ITEMS["items"])},
            "content_type": "multipart/form-data",
        },
    ],
    ids=["text-plain", "no-content-type", "urlencoded-form", "multipart-form"],
)
def test_nutrition_body_that_is_not_json_answers_415(
    counting: FlaskClient, auth_headers: dict[str, str], options: dict[str, Any]
) -> None:
    response = counting.post("/nutrition", headers=auth_headers, **options)

    assert_json_error(response, 415, "unsupported_media_type")
    assert "application/json" in response.get_json()["error"]


def test_nutrition_takes_json_with_a_charset(
    counting: FlaskClient, auth_headers: dict[str, str]
) -> None:
    response = counting.post(
        "/nutrition",
        data=json.dumps(NUTRITION_ITEMS),
        content_type="application/json; charset=utf-8",
        headers=auth_headers,
    )

    assert response.status_code == 200


# ---------------------------------------------------------------------------- over the socket


@dataclasses.dataclass(frozen=True)
class RawAnswer:
    """A status, a content type and a JSON body read straight off the socket."""

    status: int
    content_type: str
    body: Any


def send_head_and_first_bytes(server: Gunicorn, head: bytes, first_bytes: bytes) -> RawAnswer:
    """Send a request head and only the first bytes of its body, then read the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT) as connection:
        connection.sendall(head + first_bytes)
        response = http.client.HTTPResponse(connection)
        response.begin()
        return RawAnswer(
            status=response.status,
            content_type=response.getheader("Content-Type", ""),
            body=json.loads(response.read()),
        )


def test_announced_200_mb_body_answers_413_before_it_arrives(served: Gunicorn) -> None:
    first_bytes = (
        b"--edge\r\n"
        b'Content-Disposition: form-data; name="image"; filename="huge.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    ) + images.jpeg(320, 240)[:4096]
    head = (
        "POST /analyze-food HTTP/1.1\r\n"
        f"Host: {served.url.removeprefix('http://')}\r\n"
        f"Authorization: {bearer()['Authorization']}\r\n"
        "Content-Type: multipart/form-data; boundary=edge\r\n"
        f"Content-Length: {200 * MIB}\r\n"
        "\r\n"
    ).encode()

    answer = send_head_and_first_bytes(served, head, first_bytes)

    assert answer.status == 413
    assert answer.content_type.startswith("application/json")
    assert answer.body["code"] == "payload_too_large"


def test_64_kb_bearer_token_answers_401_json_over_the_socket(served: Gunicorn) -> None:
    response = served.session.post(
        f"{served.url}/analyze-food",
        files={"image": ("meal.jpg", MEAL, "image/jpeg")},
        headers={"Authorization": "Bearer " + "a" * (64 * 1024)},
        timeout=SOCKET_TIMEOUT,
    )

    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["code"] == "invalid_token"


def test_thousands_of_form_parts_answer_413_json_over_the_socket(served: Gunicorn) -> None:
    fields = [(f"field{index}", (None, "x")) for index in range(3000)]

    response = served.session.post(
        f"{served.url}/analyze-food",
        files=[("image", ("meal.jpg", MEAL, "image/jpeg")), *fields],
        headers=bearer(),
        timeout=SOCKET_TIMEOUT,
    )

    assert response.status_code == 413
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["code"] == "payload_too_large"


# ---------------------------------------------------------------------------- chunked bodies


@pytest.fixture(scope="module")
def served(
    redis_server: RedisServer,
    model_server: ChatCompletionsServer,
    user_service_server: UserServiceServer,
    sr28_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gunicorn]:
    """This module's real gunicorn counts from SR28, so POST /nutrition reads its body too."""
    workdir = tmp_path_factory.mktemp("gunicorn-hostile")
    with running_gunicorn(
        redis_server, model_server, user_service_server, workdir, NUTRITION_SOURCE=None
    ) as server:
        yield server


def meal_form() -> bytes:
    """A multipart form holding the photo, with the boundary ``edge``."""
    head = (
        b"--edge\r\n"
        b'Content-Disposition: form-data; name="image"; filename="meal.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    )
    return head + MEAL + b"\r\n--edge--\r\n"


# Each POST endpoint, with the media type and a valid body it takes.
BODIES = {
    "/nutrition": ("application/json", json.dumps(NUTRITION_ITEMS).encode()),
    "/analyze-food": ("multipart/form-data; boundary=edge", meal_form()),
}


def chunked(
    payload: bytes,
    *,
    size: bytes | None = None,
    extension: bytes = b"",
    after_data: bytes = b"\r\n",
    trailers: bytes = b"",
) -> bytes:
    """The payload as one chunk and the last chunk, each part of the framing replaceable."""
    size_line = (b"%x" % len(payload) if size is None else size) + extension
    return size_line + b"\r\n" + payload + after_data + b"0\r\n" + trailers + b"\r\n"


def with_size(size: bytes) -> Callable[[bytes], bytes]:
    """The payload chunked under a size line that reads ``size``."""
    return lambda payload: chunked(payload, size=size)


BAD_FRAMING = (400, "bad_request")
TRAILERS_TOO_LARGE = (431, "header_too_large")
MALFORMED_CHUNKED_BODIES: dict[str, tuple[Callable[[bytes], bytes], Answer]] = {
    "size-zz": (with_size(b"zz"), BAD_FRAMING),
    "size-minus-5": (with_size(b"-5"), BAD_FRAMING),
    "size-1x": (with_size(b"1x"), BAD_FRAMING),
    "size-0x2a": (with_size(b"0x2a"), BAD_FRAMING),
    "size-plus-5": (with_size(b"+5"), BAD_FRAMING),
    "size-5_0": (with_size(b"5_0"), BAD_FRAMING),
    "size-arabic-indic-five": (with_size("\u0665".encode()), BAD_FRAMING),
    "empty-size-line": (with_size(b""), BAD_FRAMING),
    "100-kb-extension": (
        lambda payload: chunked(payload, extension=b";" + b"e" * 100_000),
        BAD_FRAMING,
    ),
    "no-crlf-after-data": (lambda payload: chunked(payload, after_data=b""), BAD_FRAMING),
    "invalid-extension": (lambda payload: chunked(payload, extension=b";=x"), BAD_FRAMING),
    "trailer-without-a-colon": (
        lambda payload: chunked(payload, trailers=b"X-Trailer\r\n"),
        BAD_FRAMING,
    ),
    "100-kb-trailer": (
        lambda payload: chunked(payload, trailers=b"X-Trailer: " + b"t" * 100_000 + b"\r\n"),
        TRAILERS_TOO_LARGE,
    ),
    "1000-trailer-lines": (
        lambda payload: chunked(
            payload, trailers=b"".join(b"X-Trailer-%d: t\r\n" % n for n in range(1000))
        ),
        TRAILERS_TOO_LARGE,
    ),
}


def json_or_none(data: bytes) -> Any:
    """The body as JSON, or None when it is not JSON (gunicorn's own HTML page, say)."""
    try:
        return json.loads(data)
    except ValueError:
        return None


def send_chunked(
    server: Gunicorn, path: str, body: bytes, *, then_stop_sending: bool = False
) -> RawAnswer:
    """POST a chunked body, framed by hand, with a valid token; the answer off the socket."""
    media_type = BODIES[path][0]
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {server.url.removeprefix('http://')}\r\n"
        f"Authorization: {bearer()['Authorization']}\r\n"
        f"Content-Type: {media_type}\r\n"
        "Transfer-Encoding: chunked\r\n"
        "\r\n"
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT) as connection:
        connection.sendall(head + body)
        if then_stop_sending:
            connection.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(connection)
        response.begin()
        return RawAnswer(
            status=response.status,
            content_type=response.getheader("Content-Type", ""),
            body=json_or_none(response.read()),
        )


def assert_json_answer(answer: RawAnswer, expected: Answer) -> None:
    """A JSON error with this status and code, whose message names the chunked framing."""
    assert answer.status == expected[0], answer.body
    assert answer.content_type == "application/json"
    assert isinstance(answer.body, dict)
    assert answer.body.get("code") == expected[1]
    assert "chunked" in answer.body.get("error", "")


@pytest.mark.parametrize("path", list(BODIES))
def test_well_formed_chunked_body_is_answered(served: Gunicorn, path: str) -> None:
    answer = send_chunked(served, path, chunked(BODIES[path][1]))

    assert answer.status == 200, answer.body


@pytest.mark.parametrize("malformation", list(MALFORMED_CHUNKED_BODIES))
@pytest.mark.parametrize("path", list(BODIES))
def test_malformed_chunked_body_answers_json_4xx(
    served: Gunicorn, path: str, malformation: str
) -> None:
    frame, expected = MALFORMED_CHUNKED_BODIES[malformation]

    answer = send_chunked(served, path, frame(BODIES[path][1]))

    assert_json_answer(answer, expected)


def statuses_until_closed(server: Gunicorn, request: bytes) -> list[int]:
    """Send one request and read until the service closes: the status of every answer it sent."""
    host, port = server.url.removeprefix("http://").split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT) as connection:
        connection.sendall(request)
        while data := connection.recv(65536):
            received += data
    return [int(status) for status in re.findall(rb"(?m)^HTTP/1\.1 ([0-9]{3}) ", received)]


@pytest.mark.parametrize("malformation", list(MALFORMED_CHUNKED_BODIES))
@pytest.mark.parametrize("path", list(BODIES))
def test_malformed_chunked_body_left_unread_gets_one_answer(
    served: Gunicorn, path: str, malformation: str
) -> None:
    frame, _ = MALFORMED_CHUNKED_BODIES[malformation]
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {served.url.removeprefix('http://')}\r\n"
        "Transfer-Encoding: chunked\r\n"
        "\r\n"
    ).encode()

    statuses = statuses_until_closed(served, head + frame(BODIES[path][1]))

    assert statuses == [401]


@pytest.mark.parametrize("path", list(BODIES))
def test_chunked_body_cut_short_answers_400_json(served: Gunicorn, path: str) -> None:
    payload = BODIES[path][1]
    cut = b"%x\r\n" % len(payload) + payload[: len(payload) // 2]

    answer = send_chunked(served, path, cut, then_stop_sending=True)

    assert_json_answer(answer, BAD_FRAMING)


@pytest.mark.parametrize("path", list(BODIES))
def test_chunked_body_past_max_upload_answers_413_json(served: Gunicorn, path: str) -> None:
    payload = BODIES[path][1]
    padding = b" " * (MAX_UPLOAD_BYTES - len(payload) + 1024)
    body = payload + padding if path == "/nutrition" else payload.replace(MEAL, MEAL + padding)

    answer = send_chunked(served, path, chunked(body))

    assert_json_answer(answer, (413, "payload_too_large"))
    assert "25 MB" in answer.body["error"]


def test_json_nested_thousands_deep_answers_400_json_over_the_socket(served: Gunicorn) -> None:
    response = served.session.post(
        f"{served.url}/nutrition",
        data=nested_json(1_000),
        headers={**bearer(), "Content-Type": "application/json"},
        timeout=SOCKET_TIMEOUT,
    )

    assert response.status_code == 400
    assert response.json()["code"] == "bad_request"
