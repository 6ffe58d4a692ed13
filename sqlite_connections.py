"""SQLite connections that never cross a fork: what holds a process's connections is its own.

gunicorn forks its workers after the app is built; a SQLite handle used on both sides of a fork
corrupts the file or the memory behind it. ``ProcessConnections`` makes the holder (a thread's
connection, a pool) in the process that uses it and drops, never closes, one a parent made.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Generic, TypeVar

Holder = TypeVar("Holder")


class ProcessConnections(Generic[Holder]):
    """This process's holder of SQLite connections, made on first use in each process.

    After a fork the parent's holder is dropped: the child never uses its connections, and
    never closes them either, since closing would finalise statements the parent still runs.
    """

    def __init__(self, make: Callable[[], Holder]) -> None:
        self.make = make
        self.state: tuple[int, Holder] | None = None

    def here(self) -> Holder:
        """The holder this process made, made now when it has none (new, or forked)."""
        state = self.state
        if state is None or state[0] != os.getpid():
            state = self.state = (os.getpid(), self.make())
        return state[1]
