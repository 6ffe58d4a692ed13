"""Test images made with Pillow on the fly: formats, orientations and oddities the service meets."""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from typing import Any

from PIL import ExifTags, Image, ImageChops, ImageCms, ImageDraw, ImageFilter

RGB = tuple[int, int, int]

ORIENTATION_TAG = 0x0112
EXIF_IFD_TAG = 0x8769
GPS_IFD_TAG = 0x8825
BODY_SERIAL_NUMBER_TAG = 0xA431
CAMERA_SERIAL = "CAMERA-SERIAL-1234"
RED: RGB = (255, 0, 0)
BLUE: RGB = (0, 0, 255)

_METADATA_INFO_KEYS = {"exif", "icc_profile", "xmp", "XML:com.adobe.xmp", "comment", "photoshop"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TRANSPARENT_KEY: RGB = (1, 2, 3)


# ------------------------------------------------------------ drawing


def _plain(width: int, height: int, color: RGB) -> Image.Image:
    """A flat image with one darker ellipse, so it is not a single colour."""
    image = Image.new("RGB", (width, height), color)
    shade = tuple(channel // 2 for channel in color)
    ImageDraw.Draw(image).ellipse(
        (width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=shade
    )
    return image


def _photo(width: int, height: int, color: RGB, seed: int, noise: int = 25) -> Image.Image:
    """A phone-like scene: lit gradient, a plate with food blobs, sensor noise (deterministic).

    `noise` is the amplitude of each of the two uniform luma layers (0..noise grey levels each;
    their sum has a standard deviation of about 10.5 grey levels at 25, 3.3 at 8; 0: no noise).
    """
    rng = random.Random(seed)
    # The smooth scene is drawn small and scaled up; only the noise needs every pixel.
    scale = min(1.0, 800 / max(width, height))
    small = (max(1, round(width * scale)), max(1, round(height * scale)))
    sw, sh = small
    light = Image.radial_gradient("L").resize(small)  # bright centre, darker corners
    tilt = Image.linear_gradient("L").resize(small).point(lambda v: v // 6)
    channels = [light.point(lambda v, c=c: c - v * c // 640) for c in color]
    scene = ImageChops.add(Image.merge("RGB", channels), Image.merge("RGB", [tilt] * 3))
    draw = ImageDraw.Draw(scene)
    plate = (sw // 8, sh // 8, sw * 7 // 8, sh * 7 // 8)
    draw.ellipse(plate, fill=(236, 234, 228), outline=(190, 188, 182), width=max(1, sw // 90))
    for _ in range(6):
        cx, cy = rng.uniform(0.3, 0.7) * sw, rng.uniform(0.3, 0.7) * sh
        rx, ry = rng.uniform(0.05, 0.14) * sw, rng.uniform(0.05, 0.14) * sh
        blob = (rng.randrange(40, 230), rng.randrange(40, 230), rng.randrange(40, 230))
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=blob)
    scene = scene.filter(ImageFilter.GaussianBlur(radius=1.5))
    scene = scene.resize((width, height), Image.Resampling.BICUBIC)
    if noise <= 0:
        return scene
    # Luma noise from a seeded byte stream; two uniform layers add up to a bell-shaped spread.
    # Each byte 0..255 maps to 0..noise (v * 25 // 250 is v // 10, so 25 draws what it always has).
    layers = [
        Image.frombytes("L", (width, height), rng.randbytes(width * height)).point(
            lambda v: v * noise // 250
        )
        for _ in range(2)
    ]
    grain = ImageChops.add(layers[0], layers[1])
    return ImageChops.add(scene, Image.merge("RGB", [grain] * 3), offset=-noise)


def _scene(width: int, height: int, color: RGB = (200, 120, 60)) -> Image.Image:
    """A small non-uniform RGB picture used as the content of the other formats."""
    image = Image.linear_gradient("L").resize((width, height))
    tinted = Image.merge("RGB", [image.point(lambda v, c=c: (v * c) // 255) for c in color])
    ImageDraw.Draw(tinted).ellipse(
        (width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=(40, 160, 70)
    )
    return tinted


def _alpha_mask(width: int, height: int, transparent: bool) -> Image.Image:
    """Opaque everywhere, or a transparent background around an opaque ellipse."""
    if not transparent:
        return Image.new("L", (width, height), 255)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((width // 8, height // 8, width * 7 // 8, height * 7 // 8), 255)
    return mask


def _encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    """Encode an image in memory."""
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _exif(orientation: int | None, gps: bool, exif_extra: bool) -> Image.Exif:
    """An EXIF block with the asked-for orientation, GPS position and camera identity."""
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    if exif_extra:
        exif[0x010F] = "TestCam"  # Make
        exif[0x0110] = "TestCam Phone 12"  # Model
        exif.get_ifd(EXIF_IFD_TAG)[BODY_SERIAL_NUMBER_TAG] = CAMERA_SERIAL
    if gps:
        exif.get_ifd(GPS_IFD_TAG).update(
            {
                1: "N",  # GPSLatitudeRef
                2: (52.0, 22.0, 12.5),  # GPSLatitude: degrees, minutes, seconds
                3: "E",  # GPSLongitudeRef
                4: (4.0, 53.0, 40.0),  # GPSLongitude
            }
        )
    return exif


# ------------------------------------------------------------ accepted formats


def jpeg(
    width: int = 640,
    height: int = 480,
    *,
    color: RGB = (200, 120, 60),
    quality: int = 90,
    orientation: int | None = None,
    gps: bool = False,
    exif_extra: bool = False,
    pattern: str = "plain",
    seed: int = 0,
    noise: int = 25,
) -> bytes:
    """A baseline RGB JPEG, optionally with EXIF orientation, GPS and camera tags; deterministic.

    `pattern` is "plain" (flat colour and one ellipse, small file) or "photo" (gradients, a plate,
    food blobs and sensor noise, about the size a phone produces); `seed` varies the photo.
    `noise` (photo only, 0 to 127) is the amplitude of each of the two uniform noise layers: the
    default 25 (standard deviation about 10 grey levels) is like an un-denoised high-ISO shot, 8
    (about 3.3) like a phone's denoised daylight shot, 0 adds none.
    """
    if not 0 <= noise <= 127:
        raise ValueError(f"noise must be from 0 to 127, not {noise}")
    if pattern == "plain":
        image = _plain(width, height, color)
    elif pattern == "photo":
        image = _photo(width, height, color, seed, noise)
    else:
        raise ValueError(f"pattern must be 'plain' or 'photo', not {pattern!r}")
    options: dict[str, Any] = {"quality": quality}
    exif = _exif(orientation, gps, exif_extra)
    if len(exif) or exif.get_ifd(GPS_IFD_TAG) or exif.get_ifd(EXIF_IFD_TAG):
        options["exif"] = exif
    return _encode(image, "JPEG", **options)


def photo(shade: int) -> bytes:
    """A small JPEG of its own for each shade (0 to 255 all differ, and none is conftest's MEAL),
    so every request misses the cache unless it repeats a shade."""
    return jpeg(48, 32, color=(shade * 37 % 256, 120, 200))


def orientation_probe_jpeg(orientation: int) -> bytes:
    """A 400x200 JPEG, left half red and right half blue, tagged with the given EXIF orientation.

    After `ImageOps.exif_transpose` (checked with Pillow 13), the upright picture is:

    - 1: 400x200, left red, right blue (unchanged)
    - 2: 400x200, left blue, right red (mirrored)
    - 3: 400x200, left blue, right red (turned 180 degrees)
    - 4: 400x200, left red, right blue (flipped top to bottom)
    - 5: 200x400, top red, bottom blue (transposed)
    - 6: 200x400, top red, bottom blue (turned 90 degrees clockwise)
    - 7: 200x400, top blue, bottom red (transversed)
    - 8: 200x400, top blue, bottom red (turned 90 degrees counter-clockwise)

    A service that ignores the tag sends 400x200 with red on the left whatever the orientation.
    """
    image = Image.new("RGB", (400, 200), BLUE)
    ImageDraw.Draw(image).rectangle((0, 0, 199, 199), fill=RED)
    return _encode(image, "JPEG", quality=95, exif=_exif(orientation, False, False))


def png(width: int = 320, height: int = 240, mode: str = "RGB", transparent: bool = False) -> bytes:
    """A PNG in mode RGB, RGBA, P, I;16 or LA; `transparent` makes the background see-through.

    Transparency is an alpha channel for RGBA and LA, and a tRNS chunk for RGB (colour key) and P
    (palette index), which Pillow exposes as `info["transparency"]`.
    """
    scene = _scene(width, height)
    mask = _alpha_mask(width, height, transparent)
    if mode == "RGB":
        image = scene
        if transparent:
            # An RGB PNG marks one colour see-through with a tRNS chunk.
            image.paste(_TRANSPARENT_KEY, mask=ImageChops.invert(mask))
            return _encode(image, "PNG", transparency=_TRANSPARENT_KEY)
    elif mode == "RGBA":
        image = scene.convert("RGBA")
        image.putalpha(mask)
    elif mode == "LA":
        image = scene.convert("LA")
        image.putalpha(mask)
    elif mode == "P":
        image = scene.quantize(colors=64)
        if transparent:
            # Reserve the last palette slot for the transparent background.
            image.paste(63, mask=ImageChops.invert(mask))
            return _encode(image, "PNG", transparency=63)
    elif mode == "I;16":
        if transparent:
            raise ValueError("transparent I;16 PNGs are not generated")
        image = scene.convert("L").point(lambda v: v * 257, mode="I").convert("I;16")
    else:
        raise ValueError(f"unsupported PNG mode {mode!r}")
    return _encode(image, "PNG")


def webp(width: int = 320, height: int = 240, mode: str = "RGB") -> bytes:
    """A lossy WebP, opaque (RGB) or with a transparent background (RGBA)."""
    if mode not in {"RGB", "RGBA"}:
        raise ValueError(f"unsupported WebP mode {mode!r}")
    image = _scene(width, height)
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(_alpha_mask(width, height, transparent=True))
    return _encode(image, "WEBP", quality=85)


def gif(width: int = 320, height: int = 240, frames: int = 1) -> bytes:
    """A GIF; with several frames, an animated loop whose frames have different colours."""
    colors = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 200, 40), (160, 40, 200)]
    images = [
        _scene(width, height, colors[index % len(colors)]).convert(
            "P", palette=Image.Palette.ADAPTIVE
        )
        for index in range(frames)
    ]
    if frames == 1:
        return _encode(images[0], "GIF")
    return _encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)


# ------------------------------------------------------------ other real images


def cmyk_jpeg(width: int = 320, height: int = 240) -> bytes:
    """A CMYK JPEG (Adobe APP14 marker), as print workflows and some scanners write."""
    return _encode(_scene(width, height).convert("CMYK"), "JPEG", quality=90)


def bmp(width: int = 320, height: int = 240) -> bytes:
    """A real Windows bitmap."""
    return _encode(_scene(width, height), "BMP")


def tiff(width: int = 320, height: int = 240) -> bytes:
    """A real uncompressed TIFF."""
    return _encode(_scene(width, height), "TIFF")


# ------------------------------------------------------------ hostile or broken input


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload and the CRC of type plus payload."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_with_huge_dimensions_header(width: int = 50_000, height: int = 50_000) -> bytes:
    """A few hundred bytes whose valid IHDR claims width x height RGB pixels: a decompression bomb.

    Only the first scanline is in the IDAT, so anything that decodes it fails; Pillow's
    `Image.open` already raises `DecompressionBombError` from the header alone.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    first_row = zlib.compress(b"\x00" * (1 + 3 * width), 9)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", first_row)
        + _png_chunk(b"IEND", b"")
    )


def truncated_jpeg() -> bytes:
    """The first half of a photo-like JPEG: the header opens, decoding the pixels fails."""
    whole = jpeg(640, 480, pattern="photo")
    return whole[: len(whole) // 2]


def jpeg_with_huge_icc(size: int = 2_000_000) -> bytes:
    """A small JPEG carrying a `size`-byte ICC profile (real sRGB, padded) in APP2 markers."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    padded = profile + b"\x00" * max(0, size - len(profile))
    padded = struct.pack(">I", len(padded)) + padded[4:]  # the header's own size field
    return _encode(_plain(64, 48, (200, 120, 60)), "JPEG", quality=90, icc_profile=padded)


def jpeg_followed_by_zip() -> bytes:
    """A valid JPEG with a ZIP archive appended: a polyglot that opens as both."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("payload.txt", "hidden payload that must not travel further\n")
    return jpeg(160, 120) + archive.getvalue()


def text_bytes() -> bytes:
    """Plain text that no image decoder accepts."""
    return b"This is not an image, just some text a client sent by mistake.\n" * 4


# ------------------------------------------------------------ inspection


def exif_of(data: bytes) -> dict[str, Any]:
    """EXIF tags by name (IFD0 and Exif sub-IFD); "GPSInfo" holds the GPS IFD when there is one."""
    with Image.open(io.BytesIO(data)) as image:
        exif = image.getexif()
    tags: dict[str, Any] = {}
    for tag, value in [*exif.items(), *exif.get_ifd(EXIF_IFD_TAG).items()]:
        if tag not in (EXIF_IFD_TAG, GPS_IFD_TAG):
            tags[ExifTags.TAGS.get(tag, str(tag))] = value
    gps = exif.get_ifd(GPS_IFD_TAG)
    if gps:
        tags["GPSInfo"] = {ExifTags.GPSTAGS.get(tag, str(tag)): value for tag, value in gps.items()}
    return tags


def _jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """The (marker, payload) segments of a JPEG up to the start of scan."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG: no SOI marker")
    segments: list[tuple[int, bytes]] = []
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ValueError(f"corrupt JPEG: no marker at offset {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # stand-alone markers carry no length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        segments.append((marker, data[position + 4 : position + 2 + length]))
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        position += 2 + length
    return segments


def has_any_metadata(data: bytes) -> bool:
    """True when the image carries EXIF, ICC, XMP, comments or any APPn block other than JFIF."""
    if data[:2] == b"\xff\xd8":
        for marker, payload in _jpeg_segments(data):
            if marker == 0xFE:  # COM
                return True
            if marker == 0xE0 and not payload.startswith(b"JFIF\x00"):
                return True
            if 0xE1 <= marker <= 0xEF:  # APP1 EXIF/XMP, APP2 ICC, APP13 IPTC, APP14 Adobe...
                return True
        return False
    # Other formats: what Pillow lifts out of their metadata chunks. (TIFF tags are the
    # structure of a TIFF itself, so `getexif()` would call every TIFF tagged.)
    with Image.open(io.BytesIO(data)) as image:
        return bool(_METADATA_INFO_KEYS & set(image.info))
