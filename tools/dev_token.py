"""Development helpers for `make run` and `make token`: a JWT secret, a token, a sample photo."""

from __future__ import annotations

import argparse
import secrets
import shlex
import sys
import time
from pathlib import Path

import jwt
from PIL import Image, ImageDraw, ImageFilter

DEFAULT_SECRETS_DIR = Path(".local/secrets")
SAMPLE_PHOTO = Path(".local/sample-meal.jpg")


def ensure_secret(secrets_dir: Path) -> str:
    """The development JWT secret, written (random, mode 600) when there is none yet."""
    path = secrets_dir / "jwt_secret"
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        return path.read_text(encoding="utf-8").strip()
    secrets_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)
    print(f"wrote a new development JWT secret to {path}", file=sys.stderr)
    return value


def make_token(secret: str, user_id: str, hours: float) -> str:
    """An HS256 access token for ``user_id``."""
    now = int(time.time())
    claims = {"sub": user_id, "type": "access", "iat": now, "exp": now + int(hours * 3600)}
    return jwt.encode(claims, secret, algorithm="HS256")


def ensure_sample_photo(path: Path) -> Path:
    """A drawn plate of salmon, rice and greens, so the printed curl line works as it is."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (1600, 1200), (186, 150, 112))
    draw = ImageDraw.Draw(image)
    draw.ellipse((250, 100, 1350, 1100), fill=(245, 245, 240), outline=(210, 210, 205), width=12)
    draw.ellipse((520, 330, 980, 640), fill=(244, 140, 92))
    for offset in range(0, 300, 45):
        draw.line((560 + offset, 360, 620 + offset, 610), fill=(250, 190, 150), width=8)
    draw.ellipse((700, 600, 1120, 900), fill=(250, 250, 246))
    for step in range(12):
        x = 420 + step * 22
        draw.line((x, 650, x + 120, 880), fill=(70, 140, 60), width=14)
    image.filter(ImageFilter.GaussianBlur(2)).save(path, format="JPEG", quality=90)
    return path


def main() -> int:
    """Print a token, or a ready curl line for the local server."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--user-id", default="dev-user")
    parser.add_argument("--hours", type=float, default=12.0)
    parser.add_argument("--secrets-dir", type=Path, default=DEFAULT_SECRETS_DIR)
    parser.add_argument("--curl", metavar="BASE_URL", help="print a curl line for this server")
    args = parser.parse_args()
    token = make_token(ensure_secret(args.secrets_dir), args.user_id, args.hours)
    if not args.curl:
        print(token)
        return 0
    photo = ensure_sample_photo(SAMPLE_PHOTO)
    print("Analyse a photo (replace the file with your own meal photo):")
    print(
        f"  curl -s -H {shlex.quote('Authorization: Bearer ' + token)} "
        f"-F image=@{shlex.quote(str(photo))} '{args.curl}/analyze-food'"
    )
    print(f"Health: curl -s '{args.curl}/health'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
