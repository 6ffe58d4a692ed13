"""Development helpers for `make run` and `make token`: a JWT secret, a token, a sample photo."""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import shlex
import socket
import sys
import time
from pathlib import Path

import jwt
from PIL import Image, ImageDraw, ImageFilter

# The compose stack's JWT secret (docker-compose.yml mounts it), so one token works for both.
DEFAULT_SECRET_FILE = Path("secrets/jwt_secret.txt")
SAMPLE_PHOTO = Path(".local/sample-meal.jpg")


def ensure_secret(path: Path) -> str:
    """The development JWT secret in ``path``, written (random) when there is none yet.

    As in tools/make-secrets.sh, a new secret's folder is made 0700, so other users of this
    machine cannot reach it, and the file 0644, because the compose stack mounts it as it is and
    the container reads it as its own user (10001), not as the file's owner.
    """
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        path.chmod(0o644)
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    value = secrets.token_hex(32)
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o644)
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


def bind_error(host: str, port: int) -> OSError | None:
    """What binding host:port as gunicorn does (SO_REUSEADDR) raises; None when it works."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:  # socket.gaierror included: a HOST that does not resolve
        return error
    return None


def cannot_listen(host: str, port: int) -> str | None:
    """Why `make run` could not listen on host:port, told as what to do; None when it can."""
    error = bind_error(host, port)
    if error is None:
        return None
    if error.errno == errno.EADDRINUSE:
        free = next((p for p in range(8090, 8190) if p != port and not bind_error(host, p)), 8090)
        return f"port {port} is in use; run `make run PORT={free}`"
    return f"cannot listen on {host}:{port} ({error.strerror}); run `make run HOST=127.0.0.1`"


def print_curl_lines(base_url: str, token: str, photo: Path) -> None:
    """Ready curl lines for the local server: health, an analysis, and a saved analysis."""
    authorization = shlex.quote("Authorization: Bearer " + token)
    upload = f"-F image=@{shlex.quote(str(photo))}"
    print(f"Health:  curl -s '{base_url}/health'")
    print("Analyse a photo (replace the file with your own meal photo):")
    print(f"  curl -s -H {authorization} {upload} '{base_url}/analyze-food'")
    user_service = os.environ.get("USER_SERVICE_URL", "http://localhost:8082")
    print(f"Save it as a food entry (needs the User Service at {user_service}: make user-service):")
    print(f"  curl -s -H {authorization} {upload} '{base_url}/analyze-food?save=true'")


def main() -> int:
    """Print a token, or check the local server's address and print ready curl lines for it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--user-id", default="dev-user")
    parser.add_argument("--hours", type=float, default=12.0)
    parser.add_argument(
        "--secret-file",
        type=Path,
        default=DEFAULT_SECRET_FILE,
        help="the JWT secret to sign with, written (random) when missing",
    )
    parser.add_argument(
        "--serve",
        metavar="HOST:PORT",
        help="check that the local server can listen there, then print curl lines for it",
    )
    args = parser.parse_args()
    if args.serve:
        host, _, port = args.serve.rpartition(":")
        problem = cannot_listen(host, int(port))
        if problem:
            print(problem, file=sys.stderr)
            return 1
    token = make_token(ensure_secret(args.secret_file), args.user_id, args.hours)
    if not args.serve:
        print(token)
        return 0
    url_host = f"[{host}]" if ":" in host else host
    print_curl_lines(f"http://{url_host}:{port}", token, ensure_sample_photo(SAMPLE_PHOTO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
