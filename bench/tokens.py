"""Image tokens by OpenAI's published formulas, for a picture of a given size.

Tiles (GPT-4o family, ``detail``): low is a flat 85 tokens; high scales the picture to fit a
2048 x 2048 square, then its shortest side down to 768, and costs 170 per 512 px tile plus 85.

Patches (GPT-4.1 mini/nano, o4-mini): the number of 32 px patches that cover the picture, at most
1536 (a larger picture is scaled down until it fits the cap), times the model's multiplier.
"""

from __future__ import annotations

import math

TILE_BASE = 85
TILE_COST = 170
PATCH = 32
PATCH_CAP = 1536
PATCH_MULTIPLIERS = {"gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46, "o4-mini": 1.72}


def tile_tokens(width: int, height: int, detail: str) -> int:
    """Tokens of one image under the tile formula, for ``detail`` low or high."""
    if detail == "low":
        return TILE_BASE
    w, h = float(width), float(height)
    fit = min(1.0, 2048 / max(w, h))
    w, h = w * fit, h * fit
    if min(w, h) > 768:
        shortest = 768 / min(w, h)
        w, h = w * shortest, h * shortest
    tiles = math.ceil(round(w) / 512) * math.ceil(round(h) / 512)
    return TILE_COST * tiles + TILE_BASE


def patch_count(width: int, height: int) -> int:
    """32 px patches covering the image, after the scale-down that keeps them within the cap."""
    patches = math.ceil(width / PATCH) * math.ceil(height / PATCH)
    if patches <= PATCH_CAP:
        return patches
    shrink = math.sqrt(PATCH * PATCH * PATCH_CAP / (width * height))
    across, down = width * shrink / PATCH, height * shrink / PATCH
    shrink *= min(math.floor(across) / across, math.floor(down) / down)
    scaled_w, scaled_h = int(width * shrink), int(height * shrink)
    return min(PATCH_CAP, math.ceil(scaled_w / PATCH) * math.ceil(scaled_h / PATCH))


def patch_tokens(width: int, height: int, model: str) -> int:
    """Tokens of one image under the patch formula for this model's multiplier."""
    return math.ceil(patch_count(width, height) * PATCH_MULTIPLIERS[model])
