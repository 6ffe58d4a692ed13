"""What holds a process's SQLite connections: its own, made anew in a forked child."""

from __future__ import annotations

import os
import sqlite3

from sqlite_connections import ProcessConnections


def test_one_process_keeps_the_holder_it_made() -> None:
    connections = ProcessConnections(list[sqlite3.Connection])

    assert connections.here() is connections.here()


def test_a_forked_child_makes_its_own_holder_and_leaves_the_parents() -> None:
    connections = ProcessConnections(list[sqlite3.Connection])
    parent = connections.here()
    parent.append(sqlite3.connect(":memory:"))
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        own = connections.here()
        os.write(write, b"own" if own is not parent and own == [] else b"parent's")
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    answer = os.read(read, 16)
    os.close(read)

    assert answer == b"own"
    assert connections.here() is parent
    assert parent[0].execute("SELECT 1").fetchone() == (1,)
