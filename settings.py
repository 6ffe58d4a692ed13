"""Settings read from the environment, each declared with a parser the type checker sees.

``setting`` declares a ``Config`` field (its variable, default and ``Parser``); ``EnvReader``
reads the text and names each value it cannot read; ``Setting.problem`` says what a value breaks.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast, overload
from urllib.parse import urlsplit

from json_values import parse_json
from store import SENTINEL_SCHEME, parse_sentinel_url
from token_keys import HS_ALGORITHMS, PUBLIC_KEY_ALGORITHMS, load_public_key

T = TypeVar("T")

HEADER_NAME_PATTERN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
HTTP_URL_PATTERN = re.compile(r"^https?://[^\s/]+")
REDIS_URL_PATTERN = re.compile(r"^(rediss?|unix|redis\+sentinel)://")
# What gunicorn listens at, in the forms gunicorn.util.parse_address reads; one address.
BIND_FORMS = "host:port, [IPv6]:port, unix:/path or fd://N"
TCP_BIND_PATTERN = re.compile(
    r"(?:tcp://)?(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]/,\s]+))(?::(?P<port>[0-9]{1,6}))?"
)
GUNICORN_DEFAULT_PORT = 8000
MAX_PORT = 65535
MAX_UNIX_SOCKET_PATH = 107
# Numbers in settings: ASCII digits, an optional sign, fraction and exponent; nothing else.
INTEGER_PATTERN = re.compile(r"[+-]?[0-9]+")
DECIMAL_PATTERN = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# The words a flag is written in, settings and query parameters alike, in any case.
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off", ""})


def flag_value(text: str) -> bool | None:
    """true/false, 1/0, yes/no, on/off in any case (blank is false); None for any other word."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------


class Unreadable(ValueError):
    """Text a parser cannot read; ``what`` says what the value must be."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def allowed(variable: str, value: object) -> str | None:
    """Any value read is allowed."""
    return None


@dataclass(frozen=True)
class Parser(Generic[T]):
    """How a setting's text becomes its value, and what is wrong with a value of it.

    ``read`` raises ``Unreadable`` for text it cannot read, and returns None when the text holds
    nothing (the default stands); ``check`` names a value the setting does not allow.
    """

    read: Callable[[str], T | None]
    check: Callable[[str, T], str | None] = allowed


def as_text(raw: str) -> str:
    """The text as it is."""
    return raw


def bounded(low: float, high: float) -> Callable[[str, float], str | None]:
    """A check that a number lies from ``low`` to ``high``."""

    def check(variable: str, value: float) -> str | None:
        if not low <= value <= high:
            return f"{variable} must be from {low:g} to {high:g}, got {value!r}"
        return None

    return check


def read_number(raw: str) -> float:
    """A finite number in ASCII digits (float() would take other scripts' digits, ``1_0``)."""
    value = float(raw) if DECIMAL_PATTERN.fullmatch(raw) else math.nan
    if not math.isfinite(value):
        raise Unreadable("a number")
    return value


def read_whole_number(raw: str) -> int:
    """A whole number in ASCII digits (int() would take other scripts' digits, ``1_0``)."""
    if not INTEGER_PATTERN.fullmatch(raw):
        raise Unreadable("a whole number")
    return int(raw)


def decimal(low: float, high: float) -> Parser[float]:
    """A number from ``low`` to ``high`` (seconds, megabytes)."""
    return Parser(read_number, bounded(low, high))


def whole_number(low: int, high: int) -> Parser[int]:
    """A whole number from ``low`` to ``high``."""
    return Parser(read_whole_number, bounded(low, high))


def one_of(choices: tuple[str, ...], case: Callable[[str], str] = str.lower) -> Parser[str]:
    """One of ``choices``, read in their case (``str.upper`` for LOG_LEVEL's)."""

    def check(variable: str, value: str) -> str | None:
        if value not in choices:
            return f"{variable} must be one of {', '.join(choices)}, got {value!r}"
        return None

    return Parser(case, check)


def read_flag(raw: str) -> bool:
    """A flag's word (``flag_value``)."""
    value = flag_value(raw)
    if value is None:
        raise Unreadable("true or false")
    return value


def check_http_url(variable: str, value: str) -> str | None:
    """An http:// or https:// URL with a host."""
    if not HTTP_URL_PATTERN.match(value):
        return f"{variable} must be an http:// or https:// URL, got {value!r}"
    return None


def check_header_name(variable: str, value: str) -> str | None:
    """An HTTP header name."""
    if not HEADER_NAME_PATTERN.fullmatch(value):
        return f"{variable} must be an HTTP header name such as api-key, got {value!r}"
    return None


def check_redis_url(variable: str, value: str) -> str | None:
    """A Redis URL of a scheme redis-py reads; the value (maybe holding a password) not echoed."""
    if not REDIS_URL_PATTERN.match(value):
        return f"{variable} must start with redis://, rediss://, unix:// or redis+sentinel://"
    return None


def read_list(raw: str) -> tuple[str, ...] | None:
    """A comma-separated list; None when it names nothing."""
    return tuple(item.strip() for item in raw.split(",") if item.strip()) or None


def read_algorithms(raw: str) -> tuple[str, ...] | None:
    """The JWT algorithm allow-list, names in their usual case (checked with the rest)."""
    known = {item.upper(): item for item in (*HS_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS)}
    names = read_list(raw)
    return tuple(known.get(item.upper(), item) for item in names) if names else None


def read_pem(raw: str) -> str:
    """A PEM public key; ``\\n`` escapes (one-line environment values) become newlines."""
    return raw.replace("\\n", "\n")


def read_json_object(raw: str) -> dict[str, Any]:
    """A JSON object."""
    try:
        value = parse_json(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise Unreadable('a JSON object such as {"top_k": 20}')
    return value


plain_text: Parser[str] = Parser(as_text)
boolean_flag: Parser[bool] = Parser(read_flag)
http_url: Parser[str] = Parser(lambda raw: raw.rstrip("/"), check_http_url)
# An http(s) URL, or empty to turn off what it points at.
http_url_or_off: Parser[str] = Parser(
    lambda raw: raw.strip().rstrip("/"),
    lambda variable, value: check_http_url(variable, value) if value else None,
)
header_name: Parser[str] = Parser(as_text, check_header_name)
redis_address: Parser[str] = Parser(as_text, check_redis_url)
comma_list: Parser[tuple[str, ...]] = Parser(read_list)
jwt_algorithm_names: Parser[tuple[str, ...]] = Parser(read_algorithms)
pem_key: Parser[str] = Parser(read_pem)
json_object: Parser[dict[str, Any]] = Parser(read_json_object)


# ---------------------------------------------------------------------------------------------
# Declaring and reading settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting(Generic[T]):
    """How one ``Config`` field is read from its variable, and the values it may take."""

    variable: str
    parse: Parser[T]
    secret: bool = False
    fallback: str | None = None
    shown: str | None = None
    blank: T | None = None  # the value of a variable set to nothing, when that means something

    def problem(self, value: T | None) -> str | None:
        """What is wrong with a value of this setting, or None."""
        return None if value is None else self.parse.check(self.variable, value)


@overload
def setting(
    variable: str,
    default: None,
    parse: Parser[T],
    *,
    secret: bool = False,
    fallback: str | None = None,
    shown: str | None = None,
    blank: T | None = None,
) -> T | None: ...


@overload
def setting(
    variable: str,
    default: T,
    parse: Parser[T],
    *,
    secret: bool = False,
    fallback: str | None = None,
    shown: str | None = None,
    blank: T | None = None,
) -> T: ...


def setting(
    variable: str,
    default: Any,
    parse: Parser[Any],
    *,
    secret: bool = False,
    fallback: str | None = None,
    shown: str | None = None,
    blank: Any = None,
) -> Any:
    """A ``Config`` field, read from ``variable``: the one place a setting is declared.

    A variable set to nothing counts as unset, unless ``blank`` gives what nothing means.
    """
    declared = Setting(variable, parse, secret=secret, fallback=fallback, shown=shown, blank=blank)
    metadata = {"setting": declared}
    if isinstance(default, dict):
        return field(default_factory=dict, hash=False, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


class EnvReader:
    """Reads typed values from an environment mapping, collecting every value it cannot read."""

    def __init__(self, env: Mapping[str, str], problems: list[str]) -> None:
        self.env = env
        self.problems = problems

    def read(self, declared: Setting[T], default: T) -> T:
        """The setting's value from its variable (or its fallback's), else the default."""
        raw = self.text(declared.variable)
        if raw is None and declared.blank is not None and declared.variable in self.env:
            return declared.blank
        if raw is None and declared.fallback:
            raw = self.text(declared.fallback)
        if raw is None:
            return default
        try:
            value = declared.parse.read(raw)
        except Unreadable as refused:
            self.problems.append(f"{declared.variable} must be {refused.what}, got {raw!r}")
            value = None
        return default if value is None and default is not None else cast(T, value)

    def text(self, name: str) -> str | None:
        """A string, or None when unset or blank."""
        value = self.env.get(name, "").strip()
        return value or None


def jwt_problems(algorithms: tuple[str, ...], public_key: str | None) -> list[str]:
    """What is wrong with the token-verification settings, taken together."""
    known = (*HS_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS)
    unknown = [name for name in algorithms if name not in known]
    if unknown or not algorithms:
        return [
            f"JWT_ALGORITHMS may list only {', '.join(sorted(known))}, "
            f"got {', '.join(unknown) or 'nothing'}"
        ]
    asymmetric = [name for name in algorithms if name in PUBLIC_KEY_ALGORITHMS]
    if asymmetric and len(asymmetric) != len(algorithms):
        return ["JWT_ALGORITHMS must not mix HS algorithms with public-key ones"]
    if public_key and not asymmetric:
        return ["JWT_PUBLIC_KEY is set, so JWT_ALGORITHMS must name public-key algorithms (RS256…)"]
    if not asymmetric or not public_key:
        return []
    try:
        key = load_public_key(public_key)
    except ValueError:
        return ["JWT_PUBLIC_KEY is not a PEM public key"]
    wrong = [name for name in asymmetric if not isinstance(key, PUBLIC_KEY_ALGORITHMS[name])]
    if wrong:
        return [f"JWT_PUBLIC_KEY is a {type(key).__name__}, which cannot verify {', '.join(wrong)}"]
    return []


def redis_problems(url: str | None, cluster: bool, db: int) -> list[str]:
    """What is wrong with the Redis settings beyond their form (ports, database, service)."""
    if url is None:
        cluster_db = cluster and db != 0
        return ["REDIS_CLUSTER takes database 0 only (REDIS_DB)"] if cluster_db else []
    parts = urlsplit(url)
    if url.startswith(SENTINEL_SCHEME):
        try:
            parse_sentinel_url(url)
        except ValueError as error:
            return [str(error)]
        return []
    try:
        _ = parts.port
    except ValueError:
        return ["REDIS_URL has a port that is not one"]
    if url.startswith(("redis://", "rediss://")) and not re.fullmatch(r"/?[0-9]*", parts.path):
        return ["REDIS_URL's database (its path) must be a number, e.g. redis://cache:6379/0"]
    if cluster and (url.startswith("unix://") or parts.path.strip("/") not in ("", "0")):
        return ["REDIS_CLUSTER takes a redis:// or rediss:// node URL with database 0"]
    return []


def redis_url_password(url: str | None) -> str | None:
    """The password inside a Redis URL, if any, so that logs can blank it out."""
    return urlsplit(url).password if url else None


def read_secret_file(path: Path, problems: list[str]) -> str | None:
    """The stripped content of a secret file, or None when there is none."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"secret file {path} cannot be read ({type(error).__name__})")
        return None
    return value or None


# ---------------------------------------------------------------------------------------------
# Where gunicorn listens
# ---------------------------------------------------------------------------------------------


def bind_problem(variable: str, address: str) -> str | None:
    """Why gunicorn could not listen at an address, or None; checked before it tries and retries."""
    if address.startswith("unix:"):
        return unix_bind_problem(variable, re.split(r"unix:(?://)?", address, maxsplit=1)[1])
    if address.startswith("fd://"):
        return fd_bind_problem(variable, address)
    found = TCP_BIND_PATTERN.fullmatch(address)
    if found is None:
        return f"{variable} must be one address: {BIND_FORMS}, got {address!r}"
    port = int(found["port"] or GUNICORN_DEFAULT_PORT)
    if port > MAX_PORT:
        return f"{variable} must have a port from 0 (any free one) to {MAX_PORT}, got {address!r}"
    if found["ipv6"] is not None and not is_ip_address(found["ipv6"]):
        return f"{variable} must hold an IPv6 address between [ and ], got {address!r}"
    return host_bind_problem(variable, found["ipv6"] or found["host"], port)


def is_ip_address(text: str) -> bool:
    """Whether the text is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_bind_problem(variable: str, host: str, port: int) -> str | None:
    """Why a TCP host cannot be bound: neither an IP address nor a name that resolves."""
    if is_ip_address(host):
        return None
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return f"{variable} must name a host that resolves, got {host!r}"
    return None


def unix_bind_problem(variable: str, path: str) -> str | None:
    """Why gunicorn cannot make its Unix socket at a path."""
    folder = Path(path).parent
    if not path or len(os.fsencode(path)) > MAX_UNIX_SOCKET_PATH:
        return f"{variable} must name a socket path of 1 to {MAX_UNIX_SOCKET_PATH} bytes"
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return f"{variable} must name a socket in a folder that exists and can be written: {path!r}"
    if os.path.lexists(path) and not Path(path).is_socket():
        return f"{variable} names {path!r}, which exists and is not a socket"
    return None


def fd_bind_problem(variable: str, address: str) -> str | None:
    """Why an inherited descriptor cannot be listened on: not a number, not open, not a socket."""
    descriptor = address.removeprefix("fd://")
    if INTEGER_PATTERN.fullmatch(descriptor):
        with contextlib.suppress(OSError, OverflowError):
            if stat.S_ISSOCK(os.fstat(int(descriptor)).st_mode):
                return None
    return f"{variable} must name an open socket, got {address!r}"


listen_address: Parser[str] = Parser(as_text, bind_problem)
