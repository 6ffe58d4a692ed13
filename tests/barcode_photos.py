"""Photos of food packages with retail barcodes on them, made on the fly (deterministic).

A package photo is a coloured carton with printed shapes, blotchy lighting and sensor grain, a
white label holding the bars, tilted a few degrees, blurred a little as a phone lens does and
saved as a JPEG at phone quality. The bars come from zxing-cpp's own writer, which refuses a code
whose check digit is wrong; ``bad_check_digit_ean13`` splices one together from two good ones.
``service_decode`` decodes a photo the way the service does before it scans it.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass

import zxingcpp
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

from app import Config, open_image, reduce_while_decoding
from barcodes import check_digit_ok

THREE_MP = (2048, 1536)
TWELVE_MP = (4032, 3024)
ORIENTATION_TAG = 0x0112
# Carton colours: cereal red, tea green, biscuit blue, pasta yellow, chocolate brown.
CARTON_COLOURS = ((190, 40, 45), (60, 130, 70), (40, 80, 160), (225, 185, 50), (110, 70, 45))
# An EAN-13 symbol is 95 modules wide, its centre guard modules 45 to 49; splitting at 47 puts
# the first seven digits on the left and the last six (the check digit among them) on the right.
EAN13_MODULES = 95
EAN13_CENTRE = 47
BAR_HEIGHT_SHARE = 0.6  # the bars' height as a share of their width, as on a real package


@dataclass(frozen=True)
class Label:
    """A white label with one barcode's bars, where it sits and how it is turned.

    ``share`` is the bars' width as a share of the photo's width; ``centre`` the label's centre as
    shares of the photo's width and height; ``angle`` degrees counter-clockwise.
    """

    bars: Image.Image
    share: float = 0.25
    centre: tuple[float, float] = (0.5, 0.5)
    angle: float = 4.0


def bars(barcode_format: zxingcpp.BarcodeFormat, content: str) -> Image.Image:
    """A code's bars as zxing-cpp writes them: black on white, one pixel a module, no margin."""
    barcode = zxingcpp.create_barcode(content, barcode_format)
    return Image.fromarray(zxingcpp.write_barcode_to_image(barcode, scale=1, add_quiet_zones=False))


def bad_check_digit_ean13(first_twelve: str) -> tuple[str, Image.Image]:
    """An EAN-13 symbol whose check digit is wrong, and the 13 digits it carries.

    The writer refuses a wrong check digit, so the symbol is spliced from two good codes: the left
    half (the first seven digits) of ``first_twelve``'s code and the right half of a code that
    differs only in its seventh digit, so has another check digit. Every digit is a well-formed
    symbol character; only the check fails.
    """
    good = bars(zxingcpp.BarcodeFormat.EAN13, first_twelve)
    seventh = str((int(first_twelve[6]) + 1) % 10)
    other_twelve = first_twelve[:6] + seventh + first_twelve[7:]
    other = bars(zxingcpp.BarcodeFormat.EAN13, other_twelve)
    other_code = zxingcpp.create_barcode(other_twelve, zxingcpp.BarcodeFormat.EAN13).text
    assert good.width == other.width == EAN13_MODULES
    spliced = good.copy()
    split = EAN13_CENTRE
    spliced.paste(other.crop((split, 0, other.width, other.height)), (split, 0))
    digits = first_twelve + other_code[-1]
    assert not check_digit_ok(digits)
    return digits, spliced


def service_decode(data: bytes) -> Image.Image:
    """A photo as the service holds it before shrinking it: opened with the accepted formats,
    decoded at the reduced DCT scale for IMAGE_MAX_SIDE, turned upright by its EXIF orientation."""
    config = Config()
    image = open_image(data, config.image_max_pixels)
    reduce_while_decoding(image, config.image_max_side)
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return image


def package_photo(
    size: tuple[int, int],
    labels: Sequence[Label] = (),
    *,
    seed: int = 0,
    blur: float = 0.8,
    quality: int = 88,
    orientation: int | None = None,
) -> bytes:
    """A JPEG of a food package with these labels on it (none: a package without a code)."""
    rng = random.Random(seed)
    photo = _carton(size, rng, CARTON_COLOURS[seed % len(CARTON_COLOURS)])
    for label in labels:
        _stick(photo, label)
    photo = photo.filter(ImageFilter.GaussianBlur(blur))
    output = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    photo.save(output, format="JPEG", quality=quality, exif=exif)
    return output.getvalue()


def _carton(size: tuple[int, int], rng: random.Random, colour: tuple[int, int, int]) -> Image.Image:
    """A printed carton under uneven light: flat colour, shapes, blotches and grain."""
    width, height = size
    photo = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(photo)
    for _ in range(12):  # printed artwork: panels, discs and lines of text
        x, y = rng.randrange(width), rng.randrange(height)
        w, h = rng.randrange(width // 20, width // 3), rng.randrange(height // 40, height // 4)
        fill = tuple(rng.randrange(256) for _ in range(3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=fill)
    # Light: a coarse random field scaled up smoothly; grain: fresh noise on every pixel.
    coarse = (max(2, width // 256), max(2, height // 256))
    light = Image.frombytes("L", coarse, rng.randbytes(coarse[0] * coarse[1]))
    light = light.resize(size, Image.Resampling.BICUBIC).point(lambda v: 128 + (v - 128) // 4)
    grain = Image.frombytes("L", size, rng.randbytes(width * height))
    grain = grain.point(lambda v: 128 + (v - 128) // 10)
    for layer in (light, grain):
        photo = ImageChops.add(photo, Image.merge("RGB", [layer] * 3), offset=-128)
    return photo


def _stick(photo: Image.Image, label: Label) -> None:
    """Stick a label on the photo: bars scaled to their share, a white margin, turned, placed."""
    bar_width = round(photo.width * label.share)
    scale = bar_width / label.bars.width
    bar_height = round(bar_width * BAR_HEIGHT_SHARE)
    scaled = label.bars.resize((bar_width, bar_height), Image.Resampling.BOX)
    margin = round(12 * scale)  # more than the quiet zone any of the four formats needs
    card = Image.new("L", (bar_width + 2 * margin, bar_height + 2 * margin), 255)
    card.paste(scaled, (margin, margin))
    card = card.point(lambda v: 24 + v * 222 // 255)  # printing ink on off-white paper
    sticker = Image.merge("RGBA", [card, card, card, Image.new("L", card.size, 255)])
    turned = sticker.rotate(label.angle, Image.Resampling.BICUBIC, expand=True)
    x = round(photo.width * label.centre[0] - turned.width / 2)
    y = round(photo.height * label.centre[1] - turned.height / 2)
    photo.paste(turned, (x, y), turned)
