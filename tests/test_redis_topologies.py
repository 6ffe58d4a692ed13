"""The Redis Cluster and Sentinel set the tests start: usable, failing over, and leaving nothing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import REDIS_PASSWORD
from tests.redis_topologies import SERVICE_NAME, RedisCluster, RedisSentinelSet

SENTINEL_PASSWORD = "sentinel-test-pw-3rTq9w"
KEYS = [f"food:{n}" for n in range(100)]


def stranger(port: int) -> redis.Redis:
    """A client without a password that gives up at once (redis-py retries refusals for ~5 s)."""
    return redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))


def alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """One password-protected three-master cluster for the read-only checks."""
    with RedisCluster(REDIS_PASSWORD) as started:
        yield started


@pytest.fixture
def sentinel_set() -> Iterator[RedisSentinelSet]:
    """A fresh master, replica and sentinel: failing over changes it for good."""
    with RedisSentinelSet(REDIS_PASSWORD) as started:
        yield started


# ---------------------------------------------------------------- Redis Cluster


def test_cluster_spreads_keys_over_every_master(cluster: RedisCluster) -> None:
    cluster.flush()
    with cluster.client() as client:
        for key in KEYS:
            client.set(key, b"1")
        assert [client.get(key) for key in KEYS] == [b"1"] * len(KEYS)

    held = {}
    for port in cluster.ports:
        with cluster.node_client(port) as node:
            held[port] = node.dbsize()
    assert all(count > 0 for count in held.values()), held
    assert sum(held.values()) == len(KEYS)


def test_cluster_url_is_enough_for_redis_py(cluster: RedisCluster) -> None:
    with redis.cluster.RedisCluster.from_url(cluster.url) as client:
        client.set("from-url", b"yes")
        assert client.get("from-url") == b"yes"
        assert {node.port for node in client.get_primaries()} == set(cluster.ports)


def test_cluster_flush_empties_every_master(cluster: RedisCluster) -> None:
    with cluster.client() as client:
        for key in KEYS[:10]:
            client.set(key, b"1")

    cluster.flush()

    for port in cluster.ports:
        with cluster.node_client(port) as node:
            assert node.dbsize() == 0


def test_cluster_nodes_refuse_a_client_without_the_password(cluster: RedisCluster) -> None:
    with (
        stranger(cluster.ports[0]) as client,
        pytest.raises(redis.AuthenticationError),
    ):
        client.ping()


def test_closed_cluster_leaves_no_process() -> None:
    started = RedisCluster(REDIS_PASSWORD)
    pids = started.pids
    assert len(pids) == 3
    assert all(alive(pid) for pid in pids)

    started.close()

    assert not any(alive(pid) for pid in pids)


# ---------------------------------------------------------------- Redis Sentinel


def test_sentinel_set_fails_over_to_the_replica(sentinel_set: RedisSentinelSet) -> None:
    master, replica = sentinel_set.data_ports
    assert sentinel_set.master_port() == master
    with sentinel_set.client() as client:
        client.set("before", b"1")

    assert sentinel_set.stop_master() == master
    assert sentinel_set.wait_for_failover(timeout=15) == replica

    assert sentinel_set.master_port() == replica
    with sentinel_set.client() as client:
        client.set("after", b"2")
        assert client.get("after") == b"2"


def test_sentinel_url_names_the_sentinel_and_the_service(sentinel_set: RedisSentinelSet) -> None:
    assert sentinel_set.url == f"redis+sentinel://127.0.0.1:{sentinel_set.sentinel_port}/mymaster"
    assert sentinel_set.service_name == SERVICE_NAME


def test_sentinel_with_a_password_refuses_strangers() -> None:
    with RedisSentinelSet(REDIS_PASSWORD, sentinel_password=SENTINEL_PASSWORD) as guarded:
        with (
            stranger(guarded.sentinel_port) as client,
            pytest.raises(redis.AuthenticationError),
        ):
            client.execute_command("SENTINEL", "MASTERS")
        with guarded.client() as client:
            client.set("guarded", b"1")
            assert client.get("guarded") == b"1"


def test_closed_sentinel_set_leaves_no_process() -> None:
    started = RedisSentinelSet(REDIS_PASSWORD)
    started.stop_master()  # a killed master is reaped too
    pids = started.pids
    assert len(pids) == 3

    started.close()

    assert not any(alive(pid) for pid in pids)


# ---------------------------------------------------------------- missing programs


def test_cluster_without_redis_cli_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = shutil.which("redis-server")
    assert server is not None
    (tmp_path / "redis-server").symlink_to(server)
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(RuntimeError, match="redis-cli is not on PATH"):
        RedisCluster(REDIS_PASSWORD)


def test_sentinel_set_without_redis_server_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(RuntimeError, match="redis-server is not on PATH"):
        RedisSentinelSet(REDIS_PASSWORD)
