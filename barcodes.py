"""Retail barcodes on food packaging: read from a photo, and checked as a product lookup takes them.

A packaged food carries an EAN-13, EAN-8, UPC-A or UPC-E code. Products are looked up by one
form of each code: EAN-13 (and UPC-A and UPC-E, which are EAN-13 codes starting with 0) as 13
digits, EAN-8 as its 8 digits. ``read_barcodes`` finds every such code in a photo, already in
that form; ``lookup_form`` puts a code a caller sends into it.
"""

from __future__ import annotations

import zxingcpp
from PIL import Image

# The four retail formats a food package carries; asking for these alone makes a scan faster and
# keeps other symbologies (QR codes on the back, Code 128 on a shipping label) out of the answer.
RETAIL_FORMATS = zxingcpp.BarcodeFormats(
    [
        zxingcpp.BarcodeFormat.EAN13,
        zxingcpp.BarcodeFormat.EAN8,
        zxingcpp.BarcodeFormat.UPCA,
        zxingcpp.BarcodeFormat.UPCE,
    ]
)
# Lengths of the codes a caller may send: EAN-8, UPC-A, EAN-13.
LOOKUP_LENGTHS = frozenset({8, 12, 13})


def read_barcodes(image: Image.Image) -> tuple[str, ...]:
    """Every retail code in a photo, in the form a product is looked up by, once, in reading order.

    EAN-13 codes come as their 13 digits, UPC-A codes as EAN-13 (a leading 0), UPC-E codes
    expanded to UPC-A and then to EAN-13, EAN-8 codes as their 8 digits. A code whose check digit
    is wrong is left out. Codes turned by any angle, upside down or printed light on dark are
    read; reading order is top to bottom, then left to right, by each code's centre.
    """
    # The reader works on luminance; a grayscale copy is what it would make of the colours anyway,
    # and it takes any mode Pillow decodes (CMYK, palette, 16-bit) the same way.
    gray = image if image.mode == "L" else image.convert("L")
    found = zxingcpp.read_barcodes(
        gray,
        formats=RETAIL_FORMATS,
        try_rotate=True,
        try_downscale=True,
        try_invert=True,
    )
    placed = sorted(found, key=_reading_position)
    codes: dict[str, None] = {}
    for barcode in placed:
        code = _code_read(barcode.format, barcode.text)
        if code is not None:
            codes.setdefault(code, None)
    return tuple(codes)


def lookup_form(code: str) -> str | None:
    """The form a product is looked up by, for a code a caller sends; None when it is no such code.

    Takes 8 digits (EAN-8, kept as they are), 12 (UPC-A, given a leading 0) or 13 (EAN-13, kept),
    written in ASCII digits only and ending in the right check digit. Anything else, other
    scripts' digits, spaces and 8-digit UPC-E codes included, is None.
    """
    if len(code) not in LOOKUP_LENGTHS or not is_ascii_digits(code):
        return None
    if not check_digit_ok(code):
        return None
    return "0" + code if len(code) == 12 else code


def check_digit_ok(digits: str) -> bool:
    """Whether a GTIN's last digit (EAN-8, UPC-A, EAN-13) is the check digit of the ones before it.

    Weights 3 and 1 alternate from the digit next to the check digit leftwards; the check digit
    brings the sum to a multiple of 10. Two or more ASCII digits are needed; anything else is False.
    """
    if len(digits) < 2 or not is_ascii_digits(digits):
        return False
    *body, last = (int(digit) for digit in digits)
    total = sum(digit * (3 if index % 2 == 0 else 1) for index, digit in enumerate(reversed(body)))
    return (10 - total % 10) % 10 == last


def expand_upce(code: str) -> str | None:
    """The 12-digit UPC-A a UPC-E code stands for, or None when the code is not a UPC-E code.

    ``code`` is the 8 digits printed under a UPC-E symbol: number system (0 or 1), six digits and
    the check digit. The last of the six says where the zeros a UPC-E code drops go back in:
    for 0-2, that digit follows the first two and four zeros follow it; for 3, five zeros follow
    the first three; for 4, five follow the first four; for 5-9, four come before that digit.
    The check digit carries over unchanged; the expansion is returned whether or not it is right
    (``check_digit_ok`` says).
    """
    if len(code) != 8 or not is_ascii_digits(code) or code[0] not in "01":
        return None
    system, six, check = code[0], code[1:7], code[7]
    last = six[5]
    if last in "012":
        middle = six[0:2] + last + "0000" + six[2:5]
    elif last == "3":
        middle = six[0:3] + "00000" + six[3:5]
    elif last == "4":
        middle = six[0:4] + "00000" + six[4]
    else:
        middle = six[0:5] + "0000" + last
    return system + middle + check


def is_ascii_digits(text: str) -> bool:
    """Whether a text is nothing but ASCII digits 0-9 (not other scripts' digits, not empty)."""
    return text.isascii() and text.isdigit()


def _code_read(barcode_format: zxingcpp.BarcodeFormat, text: str) -> str | None:
    """A code as the reader gave it, in lookup form, or None when it is not a valid retail code.

    zxing-cpp 3 gives UPC-A and UPC-E codes as 13 digits already; the shorter forms other versions
    give (12 digits for UPC-A, 8 for UPC-E) are expanded here the same way.
    """
    if not is_ascii_digits(text):
        return None
    if barcode_format == zxingcpp.BarcodeFormat.UPCE and len(text) == 8:
        expanded = expand_upce(text)
        if expanded is None:
            return None
        text = expanded
    if barcode_format == zxingcpp.BarcodeFormat.EAN8:
        return text if len(text) == 8 and check_digit_ok(text) else None
    if len(text) == 12:
        text = "0" + text
    return text if len(text) == 13 and check_digit_ok(text) else None


def _reading_position(barcode: zxingcpp.Barcode) -> tuple[float, float]:
    """A code's centre, row first, so that codes sort top to bottom, then left to right."""
    corners = barcode.position
    points = (corners.top_left, corners.top_right, corners.bottom_right, corners.bottom_left)
    return (sum(point.y for point in points) / 4, sum(point.x for point in points) / 4)
