"""The stores: string values with expiry shared by every worker, behind one ``Store`` protocol.

Redis (one server, the master a Sentinel names, or a Cluster) behind a circuit breaker, or, when no
Redis is configured, an embedded SQLite file on the host that is the service's own and watched.
``build_stores`` picks one from ``RedisSettings``; nothing here knows of Flask or of ``app``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import quote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from errors import ConfigError
from sqlite_connections import ProcessConnections

logger = logging.getLogger("image_service")


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------


class StoreUnavailable(Exception):
    """Redis failed, or is being skipped after repeated failures; or the embedded file failed."""


class Store(Protocol):
    """String values with expiry, shared by every worker; each operation atomic on its own.

    A failure raises StoreUnavailable; callers treat it as a miss or go ahead unguarded.
    """

    def get(self, key: str, longest: float = math.inf) -> str | None:
        """The value, or None; a key claiming to outlive ``longest`` seconds counts as absent."""

    def set(self, key: str, value: str, ttl: float) -> None:
        """Store a value for ``ttl`` seconds."""

    def add(self, key: str, value: str, ttl: float, longest: float = math.inf) -> bool:
        """Store a value only if the key is absent; True when stored."""

    def delete_if(self, key: str, value: str) -> None:
        """Delete the key if it still holds ``value``."""

    def extend_if(self, key: str, value: str, ttl: float) -> None:
        """Give the key ``ttl`` more seconds if it still holds ``value``."""

    def count(self, key: str, ttl: float) -> int:
        """Add one to the counter at ``key`` and return it; a new counter lives ``ttl`` seconds."""

    def health(self) -> str:
        """The ``redis`` check of /health."""

    def describe(self) -> str:
        """The ``store`` check of /health."""

    @property
    def refuses_unguarded_saves(self) -> bool:
        """Whether a save with an Idempotency-Key is refused while the store fails."""


def not_counted(event: str) -> None:
    """A store event nobody counts."""


def decode_cached(raw: bytes | str | None) -> dict[str, Any] | None:
    """A JSON object read back from a store, or None when absent or unreadable."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # absurd nesting is as unreadable as any bad JSON
        logger.warning("Ignoring an unreadable cache entry")
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------------
# Redis (one server, the master a Sentinel names, or a Cluster)
# ---------------------------------------------------------------------------------------------


# What redis-py raises: a Cluster's own errors (no node reachable, slots uncovered) are not
# RedisErrors.
REDIS_ERRORS = (redis.RedisError, RedisClusterException)


class CircuitBreaker:
    """Opens after repeated failures, so a dead dependency costs nothing for a cool-off."""

    def __init__(
        self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.open_until = 0.0
        self.lock = threading.Lock()

    def allows(self) -> bool:
        """Whether a call may be tried now: closed, or the one trial call after the cool-off."""
        with self.lock:
            now = self.clock()
            if now < self.open_until:
                return False
            if self.failures >= self.threshold:
                self.open_until = now + self.cooldown
            return True

    def succeeded(self) -> None:
        """Close the breaker."""
        with self.lock:
            self.failures = 0
            self.open_until = 0.0

    def failed(self) -> bool:
        """Count a failure; True when this one opens the breaker."""
        with self.lock:
            self.failures += 1
            if self.failures < self.threshold:
                return False
            self.open_until = self.clock() + self.cooldown
            return True


def redis_problem(error: Exception) -> str:
    """A short description of a Redis failure that carries no credentials."""
    if isinstance(error, redis.AuthenticationError):
        return "authentication failed"
    if isinstance(error, redis.TimeoutError):
        return "timed out"
    if isinstance(error, redis.ConnectionError):
        return "connection failed"
    if isinstance(error, redis.ResponseError):
        return str(error).split("\n", 1)[0][:80]
    return type(error).__name__


RedisClient = redis.Redis | RedisCluster


# Deletes a key only while it still holds the caller's token, so a lock outlived by its owner
# is never released by that owner after someone else took it over.
COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Extends a key's lifetime only while it still holds the caller's token.
COMPARE_AND_EXPIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Adds one to a counter, giving it ARGV[1] ms to live when it has no expiry yet (it was just
# made): PEXPIRE NX, in a script so that every Redis version and a Cluster (one key) take it.
COUNT_WITHIN = """
local counted = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return counted
"""
# Reads a key, dropping it instead when it claims to live longer than ARGV[1] ms (or forever).
GET_WITHIN = """
local left = redis.call('PTTL', KEYS[1])
if left == -1 or left > tonumber(ARGV[1]) then redis.call('DEL', KEYS[1]) return false end
return redis.call('GET', KEYS[1])
"""


@dataclass
class RequestScope:
    """What one request has learnt of the store: whether Redis already failed while serving it."""

    redis_failed: bool = False


def no_request() -> RequestScope | None:
    """Outside a request there is no request's state to keep."""
    return None


class RedisStore:
    """String values with expiry in Redis, behind a circuit breaker; failures raise.

    ``scope`` gives the state of the request being served (None outside one), and ``count``
    counts an ``error`` or a ``skipped`` call.
    """

    def __init__(
        self,
        client: RedisClient,
        breaker: CircuitBreaker,
        kind: str = "redis",
        *,
        scope: Callable[[], RequestScope | None] = no_request,
        count: Callable[[str], None] = not_counted,
    ) -> None:
        self.client = client
        self.breaker = breaker
        self.kind = kind
        self.scope = scope
        self.count_event = count

    def describe(self) -> str:
        """``redis``, ``redis-sentinel`` or ``redis-cluster`` for /health."""
        return self.kind

    def run(self, operation: str, command: Callable[[RedisClient], Any]) -> Any:
        """Run one Redis command, or raise StoreUnavailable (logged and counted).

        After a failure Redis is not asked again within the same request, and after
        ``REDIS_BREAKER_FAILURES`` failures in a row not at all until the cool-off ends.
        """
        scope = self.scope()
        if not self.breaker.allows() or (scope is not None and scope.redis_failed):
            self.count_event("skipped")
            raise StoreUnavailable("Redis is skipped for a cool-off")
        try:
            result = command(self.client)
        except REDIS_ERRORS as error:
            if scope is not None:
                scope.redis_failed = True
            self.count_event("error")
            opened = self.breaker.failed()
            logger.warning(
                "Redis connection error on %s: %s%s",
                operation,
                redis_problem(error),
                f"; skipping Redis for {self.breaker.cooldown:g}s" if opened else "",
            )
            raise StoreUnavailable(redis_problem(error)) from None
        self.breaker.succeeded()
        return result

    def get(self, key: str, longest: float = math.inf) -> str | None:
        """The value, or None; a key claiming to outlive ``longest`` seconds is dropped."""
        if math.isinf(longest):
            raw = self.run("GET", lambda client: client.get(key))
        else:
            milliseconds = max(1, int(longest * 1000))
            raw = self.run("GET", lambda client: client.eval(GET_WITHIN, 1, key, milliseconds))
        return raw.decode() if isinstance(raw, bytes) else raw

    def set(self, key: str, value: str, ttl: float) -> None:
        """Store a value for ``ttl`` seconds."""
        self.run("SET", lambda client: client.set(key, value, px=max(1, int(ttl * 1000))))

    def add(self, key: str, value: str, ttl: float, longest: float = math.inf) -> bool:
        """Store a value only if the key is absent; True when stored (``get`` drops outlivers)."""
        stored = self.run(
            "SET NX", lambda client: client.set(key, value, px=max(1, int(ttl * 1000)), nx=True)
        )
        return bool(stored)

    def delete_if(self, key: str, value: str) -> None:
        """Delete the key if it still holds ``value``."""
        self.run("DEL", lambda client: client.eval(COMPARE_AND_DELETE, 1, key, value))

    def extend_if(self, key: str, value: str, ttl: float) -> None:
        """Give the key ``ttl`` more seconds if it still holds ``value``."""
        milliseconds = max(1, int(ttl * 1000))
        self.run(
            "PEXPIRE", lambda client: client.eval(COMPARE_AND_EXPIRE, 1, key, value, milliseconds)
        )

    def count(self, key: str, ttl: float) -> int:
        """Add one to the counter at ``key`` and return it; a new counter lives ``ttl`` seconds."""
        milliseconds = max(1, int(ttl * 1000))
        counted = self.run("INCR", lambda client: client.eval(COUNT_WITHIN, 1, key, milliseconds))
        return int(counted)

    def health(self) -> str:
        """``connected``, ``connection failed`` or ``error: <reason>``; ignores the breaker."""
        try:
            self.client.ping()
        except redis.AuthenticationError:
            return "error: authentication failed"
        except (redis.ConnectionError, redis.TimeoutError):
            return "connection failed"
        except REDIS_ERRORS as error:
            return f"error: {redis_problem(error)}"
        self.breaker.succeeded()
        return "connected"

    @property
    def refuses_unguarded_saves(self) -> bool:
        """An unreachable Redis lets saves go ahead unguarded, as the README promises."""
        return False


# ---------------------------------------------------------------------------------------------
# The embedded store (a SQLite file shared by the host's workers)
# ---------------------------------------------------------------------------------------------


# How long an embedded-store statement waits for another process's write to finish.
STORE_BUSY_SECONDS = 2.0
# How far past a caller's clock reading another's expiry may legitimately reach: a writer that
# read the clock later may have waited less for the file's lock.
STORE_CLOCK_MARGIN = STORE_BUSY_SECONDS + 1
# How often (in writes) a table without a size bound drops its expired rows.
EXPIRE_EVERY = 256


# The embedded store's statements, one per operation, each atomic on its own. ``{table}`` is one
# of EMBEDDED_TABLES, never a caller's value.
EMBEDDED_TABLES = ("analyses", "records")
EMBEDDED_SQL = {
    "create": "CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value TEXT NOT NULL,"
    " expires REAL NOT NULL, stored REAL NOT NULL, size INTEGER NOT NULL)",
    "index": "CREATE INDEX IF NOT EXISTS {table}_stored ON {table} (stored)",
    # A row claiming to live longer than the caller allows (``longest``) counts as expired.
    "get": "SELECT value FROM {table} WHERE key = ? AND expires > ? AND expires <= ?",
    "set": "INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?, ?)",
    # Inserts, or replaces only an expired value; one changed row means the key was free.
    "add": "INSERT INTO {table} VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
    " value = excluded.value, expires = excluded.expires, stored = excluded.stored,"
    " size = excluded.size WHERE {table}.expires <= ? OR {table}.expires > ?",
    "delete_if": "DELETE FROM {table} WHERE key = ? AND value = ?",
    "extend_if": "UPDATE {table} SET expires = ? WHERE key = ? AND value = ? AND expires > ?",
    # Adds one to a counter, starting a new one (with its own expiry) where the key is absent or
    # expired; one statement, so one transaction, answering the count.
    "count": "INSERT INTO {table} VALUES (?, '1', ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
    " value = CASE WHEN {table}.expires <= ? THEN '1'"
    " ELSE CAST(CAST({table}.value AS INTEGER) + 1 AS TEXT) END,"
    " expires = CASE WHEN {table}.expires <= ? THEN excluded.expires ELSE {table}.expires END,"
    " stored = excluded.stored RETURNING value",
    "expire": "DELETE FROM {table} WHERE expires <= ?",
    "size": "SELECT total(size) FROM {table}",
    # The bytes of the file's pages in use beyond an empty store's, whichever table holds them.
    "used": "SELECT (page_count - freelist_count - ?) * page_size"
    " FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()",
    # The oldest rows whose sizes, added up from the oldest, first reach the excess.
    "evict": "DELETE FROM {table} WHERE key IN (SELECT key FROM (SELECT key, size, sum(size)"
    " OVER (ORDER BY stored, key) AS running FROM {table}) WHERE running - size < ?)",
    "probe": "SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT 1)",
    "vacuum": "PRAGMA incremental_vacuum",
    "checkpoint": "PRAGMA wal_checkpoint(TRUNCATE)",
}
# Set on every new file: freed pages can be handed back to the filesystem, and every worker
# shares one write-ahead log.
EMBEDDED_FILE_PRAGMAS = ("PRAGMA auto_vacuum=INCREMENTAL", "PRAGMA journal_mode=WAL")
STORE_FILE_MODE = 0o600
STORE_FOLDER_MODE = 0o700
# SQLite's companions of a file in WAL mode: the log and its shared index.
STORE_COMPANIONS = ("-wal", "-shm")
# A database file shorter than SQLite's header was truncated: a sound one starts with a page.
SQLITE_HEADER_BYTES = 100
SQLITE_PAGE_BYTES = 4096
# The pages of an empty store (header, two tables, their indexes, a pointer map): not the
# cache's to evict.
EMPTY_STORE_PAGES = 8
# What SQLite says of a file that is no longer a database (overwritten or truncated).
DAMAGED_FILE_ERRORS = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})


class StoreRefused(Exception):
    """The embedded store's file or folder is not the service's own, or cannot hold a database."""


def ownership_problem(info: os.stat_result, what: str) -> str | None:
    """Why another user could change this file or folder, or None when only the service can."""
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.geteuid():
        return f"{what} is owned by uid {info.st_uid}, not the service's uid {os.geteuid()}"
    if mode & stat.S_IWOTH:
        return f"{what} is writable by every user (mode {mode:04o})"
    if mode & stat.S_IWGRP and info.st_gid != os.getegid():
        return f"{what} is writable by group {info.st_gid}, not the service's own (mode {mode:04o})"
    return None


def file_problem(info: os.stat_result, what: str) -> str | None:
    """Why this (lstat) entry cannot be the store's file, or None."""
    if stat.S_ISLNK(info.st_mode):
        return f"{what} is a symbolic link"
    if stat.S_ISDIR(info.st_mode):
        return f"{what} is a folder, not a file"
    if not stat.S_ISREG(info.st_mode):
        return f"{what} is not a regular file"
    return ownership_problem(info, what)


def tighten(path: Path, info: os.stat_result, private: int) -> None:
    """Take from group and others what the service's own entry lets them read (older 0644s)."""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o777 != private:
        os.chmod(path, mode & ~0o777 | private)


def prepare_store_folder(store_path: Path) -> None:
    """Create the file's folder and any missing parent (0700), or check the one there.

    A folder of the store's own (it holds nothing else) is tightened too; one shared with other
    files, such as a home or ``/var/lib``, keeps its mode.
    """
    folder = store_path.parent
    missing = [path for path in (folder, *folder.parents) if not os.path.lexists(path)]
    try:
        for path in reversed(missing):
            path.mkdir(mode=STORE_FOLDER_MODE)
            os.chmod(path, STORE_FOLDER_MODE)
        info = os.stat(folder)
        if not stat.S_ISDIR(info.st_mode):
            raise StoreRefused("the folder that should hold it is not a folder")
        own = {store_path.name, *(store_path.name + suffix for suffix in STORE_COMPANIONS)}
        alone = set(os.listdir(folder)) <= own
    except OSError as error:
        raise StoreRefused(f"the folder cannot be made or read ({error.strerror})") from None
    problem = ownership_problem(info, "the folder")
    if problem:
        raise StoreRefused(problem)
    if alone:
        tighten(folder, info, STORE_FOLDER_MODE)


def prepare_store_file(path: Path) -> os.stat_result:
    """The file once it is the service's own: created 0600, else checked (not followed), tightened.

    The folder is checked first and only the service can write it, so nobody else can swap the
    file between this check and SQLite's open.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        create_store_file(path)
        info = os.lstat(path)
    problem = file_problem(info, "the path")
    for suffix in STORE_COMPANIONS:
        companion = Path(f"{path}{suffix}")
        with contextlib.suppress(FileNotFoundError):
            found = os.lstat(companion)
            problem = problem or file_problem(found, f"its {suffix[1:].upper()} file")
            if problem is None:
                tighten(companion, found, STORE_FILE_MODE)
    if problem:
        raise StoreRefused(problem)
    tighten(path, info, STORE_FILE_MODE)
    return info


def create_store_file(path: Path) -> None:
    """A new empty file, 0600 whatever the umask (SQLite gives its log and index the same mode).

    A log left behind by a file that is gone would be replayed into the new one: it goes first.
    """
    discard_store_file(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(path, flags, STORE_FILE_MODE)
    try:
        os.fchmod(descriptor, STORE_FILE_MODE)
    finally:
        os.close(descriptor)


def discard_store_file(path: Path) -> None:
    """Remove the file and its companions, where they are plain files (never a folder)."""
    for name in (str(path), *(f"{path}{suffix}" for suffix in STORE_COMPANIONS)):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.lstat(name).st_mode):
                os.unlink(name)


def file_identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at ``path``; None when it is gone or was truncated."""
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(info.st_mode) and info.st_size < SQLITE_HEADER_BYTES:
        return None
    return info.st_dev, info.st_ino


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's flock, so one process at a time creates, checks or replaces the file."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def store_problem(error: Exception) -> str:
    """A short reason for /health that names no path."""
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return str(error).split("\n", 1)[0][:120]


def is_damaged(error: sqlite3.DatabaseError) -> bool:
    """Whether the file is no longer a database (overwritten, truncated), rather than busy."""
    return getattr(error, "sqlite_errorname", "") in DAMAGED_FILE_ERRORS


@dataclass
class OpenedFile:
    """One thread's connection, and the file (device, inode) it was opened on."""

    connection: sqlite3.Connection
    identity: tuple[int, int]


class ThreadFiles(threading.local):
    """Each thread's opened file, None until it opens one."""

    held: OpenedFile | None = None


class EmbeddedStore:
    """The same operations in a SQLite file (WAL) that every worker on the host shares.

    One table per store: the analysis cache, bounded to ``STORE_MAX_MB`` with the oldest
    entries evicted first, and the locks and idempotency records, which only expire. Each
    operation is one statement, so each is atomic across threads and processes; connections
    are opened per thread and per process (a forked worker opens its own). The file is the
    service's own (checked whenever a connection opens) and is watched: one deleted, truncated,
    replaced or damaged is noticed by the next operation, and opened or made afresh.
    """

    def __init__(
        self,
        path: Path,
        table: str,
        max_bytes: int | None = None,
        wal_pages: int = 1000,
        *,
        count: Callable[[str], None] = not_counted,
    ) -> None:
        if table not in EMBEDDED_TABLES:
            raise ValueError(f"no embedded table {table!r}")
        self.path = path
        self.sql = {name: template.format(table=table) for name, template in EMBEDDED_SQL.items()}
        self.max_bytes = max_bytes
        self.wal_pages = wal_pages
        self.threads = ProcessConnections(ThreadFiles)
        self.problem: str | None = None
        self.written = 0
        self.lock = threading.Lock()
        self.count_event = count

    def connection(self) -> sqlite3.Connection:
        """This thread's connection to the file now at the path; opened again when that changed."""
        held = self.threads.here().held
        if held is not None and held.identity == file_identity(self.path):
            return held.connection
        self.close()
        opened = self.threads.here().held = self.open()
        return opened.connection

    def open(self, damaged: tuple[int, int] | None = None) -> OpenedFile:
        """Open the file as the service's own, making it (and its tables) when it is missing.

        A file that was truncated, or the ``damaged`` one, is replaced by a new one.
        """
        prepare_store_folder(self.path)
        with folder_lock(self.path.parent):
            info = prepare_store_file(self.path)
            if info.st_size < SQLITE_HEADER_BYTES or (info.st_dev, info.st_ino) == damaged:
                info = self.replace_file()
            try:
                return self.connect(info)
            except sqlite3.DatabaseError as error:
                if not is_damaged(error):
                    raise
                logger.warning("The store %s is not a database (%s): made afresh", self.path, error)
                return self.connect(self.replace_file())

    def replace_file(self) -> os.stat_result:
        """A new empty file in place of the one at the path (and its log, which would replay)."""
        discard_store_file(self.path)
        return prepare_store_file(self.path)

    def connect(self, info: os.stat_result) -> OpenedFile:
        """A connection to the checked file, its layout and tables set; never one SQLite made."""
        uri = f"file:{quote(str(self.path.absolute()))}?mode=rw"
        connection = sqlite3.connect(
            uri, timeout=STORE_BUSY_SECONDS, isolation_level=None, check_same_thread=False
        )
        try:
            self.initialise(connection)
        except sqlite3.Error:
            connection.close()
            raise
        if file_identity(self.path) != (info.st_dev, info.st_ino):
            connection.close()
            raise StoreRefused("the file was replaced while it was opened")
        return OpenedFile(connection, (info.st_dev, info.st_ino))

    def initialise(self, connection: sqlite3.Connection) -> None:
        """Set the file's layout and both tables (kept if there) and this connection's WAL bound."""
        connection.execute("PRAGMA synchronous=NORMAL")
        for pragma in EMBEDDED_FILE_PRAGMAS:
            connection.execute(pragma)
        for table in EMBEDDED_TABLES:
            connection.execute(EMBEDDED_SQL["create"].format(table=table))
            connection.execute(EMBEDDED_SQL["index"].format(table=table))
        connection.execute(f"PRAGMA wal_autocheckpoint={self.wal_pages:d}")
        connection.execute(f"PRAGMA journal_size_limit={self.wal_pages * SQLITE_PAGE_BYTES:d}")

    def close(self) -> None:
        """Close this thread's connection (one inherited through a fork is only dropped)."""
        files = self.threads.here()
        held, files.held = files.held, None
        if held is not None:
            held.connection.close()

    def run(self, operation: str, *parameters: Any) -> sqlite3.Cursor:
        """Run one statement, or raise StoreUnavailable (logged, counted, and shown by /health)."""
        try:
            cursor = self.execute(operation, parameters)
        except (sqlite3.Error, OSError, StoreRefused) as error:
            self.close()
            self.problem = store_problem(error)
            self.count_event("error")
            logger.warning("Store error on %s in %s: %s", operation, self.path, self.problem)
            raise StoreUnavailable(self.problem) from None
        self.problem = None
        return cursor

    def execute(self, operation: str, parameters: tuple[Any, ...]) -> sqlite3.Cursor:
        """The statement on the file at the path; one found damaged is replaced and tried again."""
        connection = self.connection()
        try:
            return connection.execute(self.sql[operation], parameters)
        except sqlite3.DatabaseError as error:
            damaged = is_damaged(error)
            if not damaged and "no such table" not in str(error):
                raise
            held = self.threads.here().held
            logger.warning("The store %s is not usable (%s): opening it afresh", self.path, error)
            self.close()
            identity = held.identity if damaged and held is not None else None
            opened = self.threads.here().held = self.open(identity)
            connection = opened.connection
        return connection.execute(self.sql[operation], parameters)

    def get(self, key: str, longest: float = math.inf) -> str | None:
        """The value, or None when absent, expired, or claiming to outlive ``longest`` seconds."""
        now = time.time()
        row = self.run("get", key, now, now + longest + STORE_CLOCK_MARGIN).fetchone()
        return cast(str, row[0]) if row else None

    def set(self, key: str, value: str, ttl: float) -> None:
        """Store a value for ``ttl`` seconds, evicting the oldest entries beyond the bound."""
        now, size = time.time(), len(key) + len(value)
        self.run("set", key, value, now + ttl, now, size)
        self.note_written(size)

    def add(self, key: str, value: str, ttl: float, longest: float = math.inf) -> bool:
        """Store a value only if the key is absent, expired or outliving ``longest``; True if so."""
        now, size = time.time(), len(key) + len(value)
        outlived = now + longest + STORE_CLOCK_MARGIN
        cursor = self.run("add", key, value, now + ttl, now, size, now, outlived)
        self.note_written(size)
        return cursor.rowcount == 1

    def delete_if(self, key: str, value: str) -> None:
        """Delete the key if it still holds ``value``."""
        self.run("delete_if", key, value)

    def extend_if(self, key: str, value: str, ttl: float) -> None:
        """Give the key ``ttl`` more seconds if it still holds ``value``."""
        now = time.time()
        self.run("extend_if", now + ttl, key, value, now)

    def count(self, key: str, ttl: float) -> int:
        """Add one to the counter at ``key`` and return it; a new or expired one lives ``ttl`` s."""
        now, size = time.time(), len(key) + 20
        rows = self.run("count", key, now + ttl, now, size, now, now).fetchall()
        self.note_written(size)
        return int(rows[0][0])

    def health(self) -> str:
        """Redis is not configured: the embedded store stands in."""
        return "not configured"

    def describe(self) -> str:
        """``embedded``, or ``embedded, degraded: <reason>`` while the file cannot be used."""
        with contextlib.suppress(StoreUnavailable):
            self.run("probe").fetchone()
        return "embedded" if self.problem is None else f"embedded, degraded: {self.problem}"

    @property
    def refuses_unguarded_saves(self) -> bool:
        """A file on this host that fails is refused rather than risking a second saved entry."""
        return True

    def note_written(self, size: int) -> None:
        """Evict once a twentieth of the bound has been written since the last look.

        A table without a bound (locks, idempotency records) drops its expired rows every
        ``EXPIRE_EVERY`` writes instead.
        """
        if self.max_bytes is None:
            with self.lock:
                self.written += 1
                due = self.written % EXPIRE_EVERY == 0
            if due:
                self.run("expire", time.time())
            return
        with self.lock:
            self.written += size
            due = self.written * 20 >= self.max_bytes
            if due:
                self.written = 0
        if due:
            self.evict(self.max_bytes)

    def evict(self, max_bytes: int) -> None:
        """Drop expired entries, then the oldest, until entries and pages fit nine tenths of it.

        The entries' share of the pages to free is taken from the oldest; the freed pages go back
        to the filesystem and the log is emptied, so the files on disk shrink with the table.
        """
        self.run("expire", time.time())
        total = int(self.run("size").fetchone()[0])
        used = max(total, int(self.run("used", EMPTY_STORE_PAGES).fetchone()[0]))
        if used > max_bytes:
            self.run("evict", total * (used - max_bytes * 9 // 10) // used)
        self.run("vacuum").fetchall()
        self.run("checkpoint").fetchall()


def wal_pages_for(max_bytes: int) -> int:
    """The log's bound in pages: a tenth of ``STORE_MAX_MB``, from 16 pages to SQLite's 1000."""
    return max(16, min(1000, max_bytes // SQLITE_PAGE_BYTES // 10))


def check_embedded_store(path: Path) -> None:
    """Stop the start with one line naming ``STORE_PATH`` when the store cannot be the service's."""
    store = EmbeddedStore(path, "records")
    try:
        store.execute("probe", ()).fetchone()
    except (sqlite3.Error, OSError, StoreRefused) as error:
        raise ConfigError([f"STORE_PATH {path}: {store_problem(error)}"]) from None
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# Building the stores
# ---------------------------------------------------------------------------------------------


SENTINEL_SCHEME = "redis+sentinel://"
SENTINEL_PORT = 26379
SENTINEL_HOST_PATTERN = re.compile(r"[^:]+(:[0-9]{1,5})?")


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis: the URL (``REDIS_URL``, or one built from host, port and database)."""

    url: str
    timeout: float
    breaker_failures: int
    breaker_cooldown: float
    password: str | None = None
    sentinel_password: str | None = None
    ca_cert: str | None = None
    cluster: bool = False

    @property
    def kind(self) -> str:
        """``redis``, ``redis-sentinel`` or ``redis-cluster``, as /health names the store."""
        if self.url.startswith(SENTINEL_SCHEME):
            return "redis-sentinel"
        return "redis-cluster" if self.cluster else "redis"


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[:password@]host1:26379,host2:26379/<service>[/<db>]``, read."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int
    password: str | None


def parse_sentinel_url(url: str) -> SentinelURL:
    """The Sentinels, service and database of a Sentinel URL; ValueError saying what is wrong."""
    parts = urlsplit(url)
    addresses = parts.netloc.rpartition("@")[2].split(",")
    if any(not SENTINEL_HOST_PATTERN.fullmatch(address) for address in addresses):
        raise ValueError(
            "REDIS_URL names a Sentinel without a host, or with a port that is no number"
        )
    service, _, db = parts.path.strip("/").partition("/")
    if not service or not re.fullmatch(r"[0-9]*", db):
        raise ValueError(
            "REDIS_URL must name the Sentinel service: redis+sentinel://h1:26379/mymaster"
        )
    hosts = []
    for address in addresses:
        host, _, port = address.partition(":")
        hosts.append((host.strip("[]") or "localhost", int(port or SENTINEL_PORT)))
    return SentinelURL(tuple(hosts), service, int(db or 0), parts.password)


def build_redis_client(settings: RedisSettings) -> RedisClient:
    """A lazily connecting client with short timeouts and no hidden retries.

    One server (``redis://``, ``rediss://``), the master a Sentinel names
    (``redis+sentinel://``, found again after a failover), or a Cluster (``REDIS_CLUSTER``).
    """
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }
    url = settings.url
    if url.startswith("rediss://") and settings.ca_cert:
        options["ssl_ca_certs"] = settings.ca_cert
    if url.startswith(SENTINEL_SCHEME):
        return sentinel_master(parse_sentinel_url(url), settings, options)
    password = urlsplit(url).password or settings.password
    if settings.cluster:
        return RedisCluster.from_url(url, password=password, **options)
    return redis.Redis.from_url(url, password=password, **options)


def sentinel_master(
    address: SentinelURL, settings: RedisSettings, options: dict[str, Any]
) -> redis.Redis:
    """The master the Sentinels name for the URL's service."""
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        list(address.hosts),
        sentinel_kwargs={
            "socket_timeout": settings.timeout,
            "socket_connect_timeout": settings.timeout,
            "retry": Retry(NoBackoff(), 0),
            "password": settings.sentinel_password,
        },
    )
    password = address.password or settings.password
    master: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
        address.service, password=password, db=address.db, **options
    )
    return master


def build_stores(
    redis_settings: RedisSettings | None,
    store_path: Path,
    max_bytes: int,
    *,
    scope: Callable[[], RequestScope | None] = no_request,
    count: Callable[[str], None] = not_counted,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Store, Store]:
    """The store for analyses and the one for locks and idempotency records.

    Both are one Redis when configured. Embedded, they are two tables of one SQLite file, so
    that a stream of new photos evicting old analyses never evicts a lock or an idempotency
    record before its time. ``clock`` is the Redis breaker's monotonic time.
    """
    if redis_settings is not None:
        breaker = CircuitBreaker(
            redis_settings.breaker_failures, redis_settings.breaker_cooldown, clock
        )
        client = build_redis_client(redis_settings)
        store = RedisStore(client, breaker, redis_settings.kind, scope=scope, count=count)
        return store, store
    wal_pages = wal_pages_for(max_bytes)
    cache = EmbeddedStore(store_path, "analyses", max_bytes, wal_pages, count=count)
    return cache, EmbeddedStore(store_path, "records", wal_pages=wal_pages, count=count)
