"""Phone-like test photos for the benchmark, generated once per run into a temporary folder.

Each photo is `tests.images.jpeg(pattern="photo")`: a lit gradient, a plate with food blobs and
per-pixel sensor noise, JPEG quality 90, with an EXIF orientation, a GPS position and camera tags.
The noise decides the weight: the default (`HIGH_ISO`, two uniform 0..25 layers, a standard
deviation of about 10 grey levels, like an un-denoised high-ISO shot) gives about 4.5 MB at 12 MP
and 1.1 MB at 3 MP; `DAYLIGHT` (0..8 layers, about 3.3 grey levels, like a phone's denoised
daylight shot) gives about 2.05 MB at 12 MP.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests import images

TWELVE_MP = (4032, 3024)
THREE_MP = (2016, 1512)
# Phones store most photos landscape with "rotate 90 degrees" (6); some upright, some flipped.
ORIENTATIONS = (6, 1, 3, 8)
COLORS = ((200, 120, 60), (170, 90, 40), (210, 180, 120), (120, 140, 70), (190, 60, 50))
HIGH_ISO = 25  # amplitude of each noise layer: `tests.images.jpeg`'s default
DAYLIGHT = 8


@dataclass(frozen=True)
class PhotoSpec:
    """What to draw: size, seed (so every photo is different), EXIF orientation and noise."""

    width: int
    height: int
    seed: int
    orientation: int
    noise: int = HIGH_ISO

    @property
    def filename(self) -> str:
        """A name that says what the file holds."""
        return (
            f"photo-{self.width}x{self.height}-o{self.orientation}-s{self.seed}-n{self.noise}.jpg"
        )


def spec(size: tuple[int, int], seed: int, noise: int = HIGH_ISO) -> PhotoSpec:
    """The photo of this size, seed and noise, its orientation chosen by the seed."""
    return PhotoSpec(size[0], size[1], seed, ORIENTATIONS[seed % len(ORIENTATIONS)], noise)


def render(photo: PhotoSpec, folder: str) -> str:
    """Draw one photo into the folder (in a worker process); return its path."""
    path = Path(folder) / photo.filename
    if not path.exists():
        data = images.jpeg(
            photo.width,
            photo.height,
            color=COLORS[photo.seed % len(COLORS)],
            quality=90,
            orientation=photo.orientation,
            gps=True,
            exif_extra=True,
            pattern="photo",
            seed=photo.seed,
            noise=photo.noise,
        )
        path.write_bytes(data)
    return str(path)


class PhotoLibrary:
    """Photos by spec, drawn in parallel the first time they are asked for, then read from disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def generate(self, specs: list[PhotoSpec]) -> None:
        """Draw every photo not drawn yet, one process per core."""
        missing = [item for item in specs if not (self.folder / item.filename).exists()]
        if not missing:
            return
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(render, missing, [str(self.folder)] * len(missing)))

    def load(self, specs: list[PhotoSpec]) -> list[bytes]:
        """The bytes of each photo, drawing the missing ones first."""
        self.generate(specs)
        return [(self.folder / item.filename).read_bytes() for item in specs]
