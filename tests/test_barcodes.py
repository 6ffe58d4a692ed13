"""Barcodes read from package photos as the service decodes them, and codes callers send."""

from __future__ import annotations

import pytest
import zxingcpp

from barcodes import check_digit_ok, expand_upce, lookup_form, read_barcodes
from tests.barcode_photos import (
    THREE_MP,
    TWELVE_MP,
    Label,
    bad_check_digit_ean13,
    bars,
    package_photo,
    service_decode,
)

EAN13 = zxingcpp.BarcodeFormat.EAN13
EAN8 = zxingcpp.BarcodeFormat.EAN8
UPCA = zxingcpp.BarcodeFormat.UPCA
UPCE = zxingcpp.BarcodeFormat.UPCE

NUTELLA = "3017620422003"  # EAN-13
COLA_UPC_A = "036000291452"  # UPC-A; looked up as 0036000291452
GUM_UPC_E = "04252614"  # UPC-E; expands to UPC-A 042100005264, looked up as 0042100005264
TEA_EAN8 = "96385074"  # EAN-8


def read_photo(data: bytes) -> tuple[str, ...]:
    """The codes read from a photo the way the service decodes it."""
    return read_barcodes(service_decode(data))


# ------------------------------------------------------------------ photos


def test_a_3_mp_photo_of_an_ean_13_code_is_read() -> None:
    photo = package_photo(THREE_MP, [Label(bars(EAN13, NUTELLA))], seed=1)
    assert service_decode(photo).size == (1024, 768)
    assert read_photo(photo) == (NUTELLA,)


def test_a_12_mp_photo_with_the_code_a_quarter_of_its_width_is_read() -> None:
    photo = package_photo(TWELVE_MP, [Label(bars(EAN13, NUTELLA), share=0.25)], seed=2)
    assert service_decode(photo).size == (1008, 756)
    assert read_photo(photo) == (NUTELLA,)


@pytest.mark.parametrize("angle", [93.0, -87.0])
def test_a_code_turned_90_degrees_in_a_12_mp_photo_is_read(angle: float) -> None:
    photo = package_photo(TWELVE_MP, [Label(bars(EAN13, NUTELLA), angle=angle)], seed=3)
    assert read_photo(photo) == (NUTELLA,)


def test_a_code_in_a_photo_the_phone_stored_turned_is_read_once_turned_upright() -> None:
    # Stored landscape with EXIF "rotate 90 degrees" (6): the service's decode is portrait.
    photo = package_photo(TWELVE_MP, [Label(bars(EAN13, NUTELLA), angle=86.0)], orientation=6)
    assert service_decode(photo).size == (756, 1008)
    assert read_photo(photo) == (NUTELLA,)


def test_a_upc_a_code_is_read_in_its_ean_13_form() -> None:
    photo = package_photo(THREE_MP, [Label(bars(UPCA, COLA_UPC_A))], seed=4)
    assert read_photo(photo) == ("0" + COLA_UPC_A,)


def test_an_ean_8_and_a_upc_e_code_are_read_top_to_bottom_upc_e_expanded() -> None:
    labels = [
        Label(bars(UPCE, GUM_UPC_E), share=0.18, centre=(0.6, 0.75), angle=-3.0),
        Label(bars(EAN8, TEA_EAN8), share=0.2, centre=(0.35, 0.3)),
    ]
    photo = package_photo(THREE_MP, labels, seed=5)
    assert read_photo(photo) == (TEA_EAN8, "0042100005264")


def test_the_same_code_twice_in_a_photo_is_read_once() -> None:
    labels = [
        Label(bars(EAN13, NUTELLA), share=0.2, centre=(0.25, 0.5)),
        Label(bars(EAN13, NUTELLA), share=0.2, centre=(0.75, 0.5), angle=-5.0),
    ]
    assert read_photo(package_photo(THREE_MP, labels, seed=6)) == (NUTELLA,)


def test_a_code_whose_check_digit_is_wrong_is_left_out() -> None:
    digits, spliced = bad_check_digit_ean13(NUTELLA[:12])
    photo = package_photo(TWELVE_MP, [Label(spliced)], seed=7)
    image = service_decode(photo).convert("L")
    # The reader sees the code and finds its check digit wrong; read_barcodes gives nothing.
    seen = zxingcpp.read_barcodes(image, formats=[EAN13], return_errors=True)
    assert [barcode.text for barcode in seen] == [digits]
    assert read_barcodes(image) == ()


def test_a_photo_without_a_code_gives_none() -> None:
    assert read_photo(package_photo(TWELVE_MP, [], seed=8)) == ()


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_any_mode_pillow_decodes_is_read(mode: str) -> None:
    image = service_decode(package_photo(THREE_MP, [Label(bars(EAN13, NUTELLA))], seed=9))
    assert read_barcodes(image.convert(mode)) == (NUTELLA,)


# ------------------------------------------------------------------ codes callers send


@pytest.mark.parametrize(
    ("code", "form"),
    [
        (NUTELLA, NUTELLA),
        (COLA_UPC_A, "0" + COLA_UPC_A),
        ("0" + COLA_UPC_A, "0" + COLA_UPC_A),
        (TEA_EAN8, TEA_EAN8),
        ("00000000", "00000000"),
    ],
)
def test_lookup_form_of_a_valid_code(code: str, form: str) -> None:
    assert lookup_form(code) == form


@pytest.mark.parametrize(
    "code",
    [
        "3017620422004",  # EAN-13, check digit wrong
        "036000291453",  # UPC-A, check digit wrong
        "96385075",  # EAN-8, check digit wrong
        "30176204220O3",  # a letter O for a zero
        "abcdefghijklm",
        "03600029145",  # 11 digits
        "0425261",  # 7 digits
        "30176204220030",  # 14 digits
        "",
        "١٢٣",  # Arabic-Indic digits
        "٠٣٦٠٠٠٢٩١٤٥٢",  # a valid UPC-A in Arabic-Indic digits
        "３０１７６２０４２２００３",  # a valid EAN-13 in full-width digits  # noqa: RUF001
        " 96385074",
        "96385074\n",
        "3017620422003 ",
    ],
)
def test_lookup_form_refuses_what_is_not_a_valid_code(code: str) -> None:
    assert lookup_form(code) is None


def test_check_digit_ok() -> None:
    assert check_digit_ok(NUTELLA)
    assert check_digit_ok("0" + COLA_UPC_A)
    assert check_digit_ok(TEA_EAN8)
    assert not check_digit_ok("3017620422005")
    assert not check_digit_ok("7")
    assert not check_digit_ok("12a4")


# Expansions as zxing-cpp's writer makes them from the first seven digits.
@pytest.mark.parametrize(
    ("upc_e", "upc_a"),
    [
        ("04252614", "042100005264"),  # last of the six 0-2
        ("01234505", "012000003455"),  # 5-9
        ("01234531", "012300000451"),  # 3
        ("01234543", "012340000053"),  # 4
        ("11234502", "112000003452"),  # number system 1
    ],
)
def test_upc_e_expands_to_upc_a(upc_e: str, upc_a: str) -> None:
    assert expand_upce(upc_e) == upc_a


@pytest.mark.parametrize("code", ["24252614", "0425261", "042526140", "0425261x"])
def test_what_is_not_a_upc_e_code_does_not_expand(code: str) -> None:
    assert expand_upce(code) is None
