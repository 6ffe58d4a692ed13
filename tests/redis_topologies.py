"""Real Redis topologies for the tests: a three-master Redis Cluster and a Sentinel set.

Each class starts real `redis-server` processes on free loopback ports in its constructor, waits
until the topology is usable, and must be closed by whoever made it (`close()` or a `with`
block), which removes every process and temp dir. Nothing is skipped: without `redis-server` or
`redis-cli` on PATH the constructor raises.

Passwords: every data node has `requirepass` and `masterauth` set to `password`. The cluster's
`url` carries it (`redis://:<password>@127.0.0.1:<port>/0`, for REDIS_CLUSTER=true). The
Sentinel set's `url` carries no credentials (`redis+sentinel://127.0.0.1:<port>/mymaster`): the
data nodes' password is given apart (REDIS_PASSWORD), and the sentinel itself asks for one only
when `sentinel_password` is set (redis-py: `Sentinel(..., sentinel_kwargs={"password": ...})`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.fakes import LOOPBACK, ClosesOnExit, PortInUseError, die_with_parent, free_port

SERVICE_NAME = "mymaster"
CLUSTER_SLOTS = 16384
CLIENT_TIMEOUT = 5.0  # seconds, each command a client built here sends
POLL_INTERVAL = 0.05  # seconds between readiness probes

_open_topologies: set[ClosesOnExit] = set()  # strong refs: a forgotten topology still stops


@atexit.register
def _close_forgotten_topologies() -> None:
    """Safety net only: fixtures must close what they start."""
    for topology in list(_open_topologies):
        topology.close()


def require_binary(name: str) -> str:
    """The path of a Redis program, or a RuntimeError that says how to install it."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} is not on PATH; the Redis Cluster and Sentinel tests need real Redis "
            "programs (Debian: `apt-get install redis-server`, which brings redis-tools with "
            "redis-cli) and do not skip without them"
        )
    return path


def _config_value(value: str) -> str:
    """A value quoted for redis.conf, so passwords with spaces or quotes survive."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _auth_lines(password: str | None) -> list[str]:
    """The config lines that make a data node ask for, and replicate with, this password."""
    if password is None:
        return []
    return [f"requirepass {_config_value(password)}", f"masterauth {_config_value(password)}"]


def _data_node_lines() -> list[str]:
    """Config shared by every data node: no persistence, no waits on replicas to sync or stop."""
    return ['save ""', "appendonly no", "repl-diskless-sync-delay 0", "shutdown-timeout 0"]


class RedisProcess:
    """One `redis-server` (data node or sentinel) in its own temp dir, configured by a file there.

    The config file keeps passwords out of the process list. On Linux the process gets SIGTERM
    when the thread that started it ends (prctl PDEATHSIG), so start it from the main thread.
    """

    def __init__(
        self,
        name: str,
        settings: Callable[[int], list[str]],
        *,
        password: str | None,
        sentinel: bool = False,
        startup_timeout: float = 10.0,
    ) -> None:
        """Start on a free port with the lines `settings(port)` returns, retrying a taken port."""
        self.name = name
        self.password = password
        self.startup_timeout = startup_timeout
        self._binary = require_binary("redis-server")
        self._sentinel = sentinel
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._last_log = ""
        self.pid = 0  # of the last start
        for attempt in range(3):
            self.port = free_port()
            try:
                self._start(settings(self.port))
                return
            except PortInUseError:
                if attempt == 2:
                    raise

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def client(self, **options: Any) -> redis.Redis:
        """A direct client to this process (bytes responses, its password); the caller closes it."""
        settings: dict[str, Any] = {
            "socket_timeout": CLIENT_TIMEOUT,
            "socket_connect_timeout": CLIENT_TIMEOUT,
            **options,
        }
        return redis.Redis(host=LOOPBACK, port=self.port, password=self.password, **settings)

    def log(self) -> str:
        """What the process printed so far (of its last run once stopped)."""
        if self._dir is not None and (self._dir / "redis.log").exists():
            return (self._dir / "redis.log").read_text(errors="replace")
        return self._last_log

    def kill(self) -> None:
        """SIGKILL the process and reap it: a crash, no goodbye to replicas or sentinels."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=5)

    def stop(self) -> None:
        """Terminate the process, wait for it and remove its temp dir; safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._dir is not None:
            self._last_log = self.log()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _start(self, extra_lines: list[str]) -> None:
        """Write the config, start the process and wait until it answers as itself."""
        self._dir = Path(tempfile.mkdtemp(prefix=f"redis-{self.name}-"))
        config = self._dir / ("sentinel.conf" if self._sentinel else "redis.conf")
        lines = [
            f"bind {LOOPBACK}",
            f"port {self.port}",
            f"dir {_config_value(str(self._dir))}",
            "daemonize no",
            'logfile ""',
            *extra_lines,
        ]
        config.write_text("\n".join(lines) + "\n")
        command = [self._binary, str(config), *(["--sentinel"] if self._sentinel else [])]
        with open(self._dir / "redis.log", "wb") as log_file:
            self._process = subprocess.Popen(
                command,
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # only calls prctl: fork-safe
            )
        self.pid = self._process.pid
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        """Poll until our own process answers INFO, or stop it and raise with its log."""
        deadline = time.monotonic() + self.startup_timeout
        with self.client(
            socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        ) as probe:
            while True:
                exit_code = self._process.poll() if self._process else -1
                if exit_code is not None:
                    self.stop()
                    in_use = "Address already in use" in self.log()
                    error = PortInUseError if in_use else RuntimeError
                    raise error(f"{self.name} exited with {exit_code}:\n{self.log()}")
                try:
                    # Another server may hold the port: only our process's answer counts.
                    if probe.info("server").get("process_id") == self.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    pass  # not up yet, or a stranger on the port
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.name} did not answer within {self.startup_timeout} s:\n{self.log()}"
                    )
                time.sleep(POLL_INTERVAL)


def _logs(processes: Iterable[RedisProcess]) -> str:
    """Every process's log under a header naming it, for error messages."""
    return "\n".join(f"--- {p.name} (port {p.port}) ---\n{p.log()}" for p in processes)


def _info_fields(answer: Any) -> dict[str, str]:
    """CLUSTER INFO's answer as a dict of strings, parsed by redis-py already or still text."""
    if isinstance(answer, dict):
        return {str(key): str(value) for key, value in answer.items()}
    text = answer.decode() if isinstance(answer, bytes) else str(answer)
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _role(node: RedisProcess) -> str | None:
    """What ROLE says the node is (master, slave, sentinel), None when it does not answer."""
    try:
        with node.client(socket_timeout=0.5, socket_connect_timeout=0.5) as connection:
            answer = connection.execute_command("ROLE")
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return None
    role = answer[0]
    return role.decode() if isinstance(role, bytes) else str(role)


# ---------------------------------------------------------------- Redis Cluster


class RedisCluster(ClosesOnExit):
    """Three `redis-server --cluster-enabled yes` masters on loopback, joined and serving.

    Every slot is assigned (no replicas), so any key can be written. `url` and `password` are
    what the service gets with REDIS_CLUSTER=true; `client()` is redis-py's own cluster client.
    """

    MASTERS = 3

    def __init__(self, password: str | None = None, *, startup_timeout: float = 20.0) -> None:
        """Start three masters, join them with `redis-cli --cluster create`, wait for state ok."""
        self.password = password
        self.startup_timeout = startup_timeout
        self._cli = require_binary("redis-cli")
        require_binary("redis-server")
        self._nodes: list[RedisProcess] = []
        self.pids: list[int] = []
        _open_topologies.add(self)
        try:
            for index in range(self.MASTERS):
                node = RedisProcess(
                    f"cluster-{index}", self._node_lines, password=password, startup_timeout=10
                )
                self._nodes.append(node)
                self.pids.append(node.pid)
            deadline = time.monotonic() + startup_timeout
            self._create(deadline)
            self._wait_until_ok(deadline)
        except BaseException:
            self.close()
            raise

    @property
    def ports(self) -> list[int]:
        """The masters' client ports."""
        return [node.port for node in self._nodes]

    @property
    def url(self) -> str:
        """`redis://:<password>@127.0.0.1:<first port>/0`: one startup node, the rest discovered."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.ports[0]}/0"

    @property
    def startup_nodes(self) -> list[redis.cluster.ClusterNode]:
        """A new ClusterNode for every master, as `RedisCluster(startup_nodes=...)` takes."""
        return [redis.cluster.ClusterNode(LOOPBACK, port) for port in self.ports]

    def client(self, **options: Any) -> redis.cluster.RedisCluster:
        """A new cluster client (bytes responses, the password); the caller closes it."""
        settings: dict[str, Any] = {
            "socket_timeout": CLIENT_TIMEOUT,
            "socket_connect_timeout": CLIENT_TIMEOUT,
            **options,
        }
        return redis.cluster.RedisCluster(
            startup_nodes=self.startup_nodes, password=self.password, **settings
        )

    def node_client(self, port: int, **options: Any) -> redis.Redis:
        """A plain client to one master (to look at what it holds); the caller closes it."""
        return self._node(port).client(**options)

    def flush(self) -> None:
        """FLUSHALL on every master."""
        for node in self._nodes:
            with node.client() as connection:
                connection.flushall()

    def close(self) -> None:
        """Stop every master and remove its temp dir; safe to call twice."""
        for node in self._nodes:
            node.stop()
        _open_topologies.discard(self)

    def _node(self, port: int) -> RedisProcess:
        """The master listening on this port."""
        for node in self._nodes:
            if node.port == port:
                return node
        raise KeyError(f"no cluster node on port {port}; the ports are {self.ports}")

    def _node_lines(self, port: int) -> list[str]:
        """Cluster settings; the bus port is a free one, not port + 10000 (may pass 65535)."""
        return [
            *_data_node_lines(),
            *_auth_lines(self.password),
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            "cluster-node-timeout 5000",
            f"cluster-port {free_port()}",
        ]

    def _create(self, deadline: float) -> None:
        """Assign every slot across the masters with `redis-cli --cluster create`."""
        addresses = [f"{LOOPBACK}:{port}" for port in self.ports]
        command = [self._cli, "--cluster", "create", *addresses]
        command += ["--cluster-replicas", "0", "--cluster-yes"]
        # REDISCLI_AUTH is redis-cli's `-a` without the password in argv or the warning it prints.
        environment = {**os.environ, **({"REDISCLI_AUTH": self.password} if self.password else {})}
        try:
            result = subprocess.run(
                command,
                env=environment,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=max(deadline - time.monotonic(), 1.0),
                check=False,
            )
        except subprocess.TimeoutExpired as timeout:
            output = (timeout.stdout or b"").decode(errors="replace")
            raise RuntimeError(
                f"redis-cli --cluster create did not finish within {self.startup_timeout} s:\n"
                f"{output}\n{_logs(self._nodes)}"
            ) from None
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(
                f"redis-cli --cluster create exited with {result.returncode}:\n"
                f"{output}\n{_logs(self._nodes)}"
            )

    def _wait_until_ok(self, deadline: float) -> None:
        """Poll CLUSTER INFO until every master says state ok, all slots, every node known."""
        last_seen: dict[int, dict[str, str]] = {}
        while True:
            if all(self._node_is_ok(node, last_seen) for node in self._nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the cluster was not ok on every node within {self.startup_timeout} s; "
                    f"last CLUSTER INFO by port: {last_seen}\n{_logs(self._nodes)}"
                )
            time.sleep(POLL_INTERVAL)

    def _node_is_ok(self, node: RedisProcess, last_seen: dict[int, dict[str, str]]) -> bool:
        """Whether this master sees the whole cluster serving; its CLUSTER INFO kept for errors."""
        try:
            with node.client(socket_timeout=0.5, socket_connect_timeout=0.5) as connection:
                answer = connection.execute_command("CLUSTER INFO")
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        fields = last_seen[node.port] = _info_fields(answer)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
            and fields.get("cluster_known_nodes") == str(self.MASTERS)
        )


# ---------------------------------------------------------------- Redis Sentinel


class RedisSentinelSet(ClosesOnExit):
    """One master, one replica and one sentinel watching them as `mymaster`, on loopback.

    The data nodes ask for `password` (REDIS_PASSWORD for the service; `url` carries none). The
    sentinel asks for `sentinel_password` when one is given, and for nothing by default.
    `stop_master()` then `wait_for_failover()` is a crash of the master and its replacement.
    """

    def __init__(
        self,
        password: str | None = None,
        *,
        sentinel_password: str | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        """Start master, replica (in sync) and sentinel (seeing both); raise with logs if not."""
        self.password = password
        self.sentinel_password = sentinel_password
        self.service_name = SERVICE_NAME
        self.startup_timeout = startup_timeout
        require_binary("redis-server")
        self._nodes: list[RedisProcess] = []
        self._sentinel: RedisProcess | None = None
        self._managers: list[redis.sentinel.Sentinel] = []
        self._stopped_port: int | None = None
        self.pids: list[int] = []
        _open_topologies.add(self)
        try:
            deadline = time.monotonic() + startup_timeout
            master = self._start_data_node("sentinel-master", [])
            self._start_data_node("sentinel-replica", [f"replicaof {LOOPBACK} {master.port}"])
            self._wait_for(self._replica_in_sync, deadline, "the replica to sync with the master")
            self._sentinel = self._start_sentinel(master.port)
            self._wait_for(self._sentinel_sees_both, deadline, "the sentinel to see both nodes")
        except BaseException:
            self.close()
            raise

    @property
    def sentinel_port(self) -> int:
        """Where the sentinel answers."""
        return self._running_sentinel().port

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """The (host, port) pairs `redis.sentinel.Sentinel` takes."""
        return [(LOOPBACK, self.sentinel_port)]

    @property
    def url(self) -> str:
        """`redis+sentinel://127.0.0.1:<sentinel port>/mymaster`, no credentials in it."""
        return f"redis+sentinel://{LOOPBACK}:{self.sentinel_port}/{self.service_name}"

    @property
    def data_ports(self) -> list[int]:
        """The master's and the replica's ports, in the order they were started."""
        return [node.port for node in self._nodes]

    def master_port(self) -> int:
        """The port the sentinel names as the master now."""
        with self._sentinel_client() as sentinel:
            address = sentinel.sentinel_get_master_addr_by_name(self.service_name)
        if not address:
            raise RuntimeError(f"the sentinel knows no master {self.service_name!r}")
        return int(address[1])

    def stop_master(self) -> int:
        """SIGKILL the process the sentinel names as master; its port."""
        port = self.master_port()
        self._node(port).kill()
        self._stopped_port = port
        return port

    def wait_for_failover(self, timeout: float = 15.0) -> int:
        """Wait until the sentinel names the former replica master and it says so; its port."""
        if self._stopped_port is None:
            raise RuntimeError("wait_for_failover() follows stop_master()")
        successor = next(n for n in self._nodes if n.port != self._stopped_port)

        def promoted() -> bool:
            """Whether the failover is over (what redis-py checks) and the successor says master."""
            return self._sentinel_names_healthy_master(successor.port) and (
                _role(successor) == "master"
            )

        self._wait_for(promoted, time.monotonic() + timeout, "the failover", timeout)
        return successor.port

    def sentinel(self, **options: Any) -> redis.sentinel.Sentinel:
        """A new redis-py Sentinel with both passwords set; closed by close() if not before."""
        timeouts = {"socket_timeout": CLIENT_TIMEOUT, "socket_connect_timeout": CLIENT_TIMEOUT}
        manager = redis.sentinel.Sentinel(
            self.sentinels,
            sentinel_kwargs={**timeouts, "password": self.sentinel_password},
            **{**timeouts, "password": self.password, **options},
        )
        self._managers.append(manager)
        return manager

    def client(self, **options: Any) -> redis.Redis:
        """A new client to whichever node is master, found through the sentinel; caller closes."""
        master: redis.Redis = self.sentinel().master_for(
            self.service_name, password=self.password, **options
        )
        return master

    def flush(self) -> None:
        """FLUSHALL on the current master (the replica follows)."""
        with self._node(self.master_port()).client() as connection:
            connection.flushall()

    def close(self) -> None:
        """Stop the sentinel and both data nodes, remove their temp dirs; safe to call twice."""
        managers, self._managers = self._managers, []
        for manager in managers:
            manager.close()
        for process in [*([self._sentinel] if self._sentinel else []), *self._nodes]:
            process.stop()
        _open_topologies.discard(self)

    def _start_data_node(self, name: str, extra_lines: list[str]) -> RedisProcess:
        """Start a password-protected data node with these extra config lines."""
        lines = [*_data_node_lines(), *_auth_lines(self.password), *extra_lines]
        node = RedisProcess(name, lambda _port: lines, password=self.password)
        self._nodes.append(node)
        self.pids.append(node.pid)
        return node

    def _start_sentinel(self, master_port: int) -> RedisProcess:
        """Start the sentinel monitoring the master, quorum 1, quick to judge it down."""
        name = self.service_name
        lines = [
            f"sentinel monitor {name} {LOOPBACK} {master_port} 1",
            f"sentinel down-after-milliseconds {name} 1000",
            f"sentinel failover-timeout {name} 3000",
        ]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {name} {_config_value(self.password)}")
        if self.sentinel_password is not None:
            lines.append(f"requirepass {_config_value(self.sentinel_password)}")
        sentinel = RedisProcess(
            "sentinel", lambda _port: lines, password=self.sentinel_password, sentinel=True
        )
        self.pids.append(sentinel.pid)
        return sentinel

    def _running_sentinel(self) -> RedisProcess:
        """The sentinel process, which exists once the constructor returned."""
        if self._sentinel is None:
            raise RuntimeError("the sentinel is not running")
        return self._sentinel

    def _sentinel_client(self) -> redis.Redis:
        """A direct client to the sentinel (its password, if any); the caller closes it."""
        return self._running_sentinel().client(socket_timeout=1, socket_connect_timeout=1)

    def _node(self, port: int) -> RedisProcess:
        """The data node listening on this port."""
        for node in self._nodes:
            if node.port == port:
                return node
        raise KeyError(f"no data node on port {port}; the ports are {self.data_ports}")

    def _replica_in_sync(self) -> bool:
        """Whether the replica's INFO replication says master_link_status:up."""
        try:
            with self._nodes[1].client(socket_timeout=0.5) as connection:
                replication = connection.info("replication")
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        return bool(replication.get("master_link_status") == "up")

    def _sentinel_names_healthy_master(self, port: int) -> bool:
        """Whether SENTINEL MASTER gives this port, not down and no failover under way."""
        try:
            with self._sentinel_client() as sentinel:
                state = sentinel.sentinel_master(self.service_name)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        return bool(
            int(state.get("port", 0)) == port
            and state.get("is_master")
            and not state.get("is_sdown")
            and not state.get("is_odown")
            and "failover_in_progress" not in state.get("flags", set())
        )

    def _sentinel_sees_both(self) -> bool:
        """Whether the sentinel names our master, healthy, and lists our replica as linked."""
        master, replica = self._nodes
        if not self._sentinel_names_healthy_master(master.port):
            return False
        try:
            with self._sentinel_client() as sentinel:
                replicas = sentinel.sentinel_slaves(self.service_name)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        return bool(
            any(
                int(r.get("port", 0)) == replica.port
                and r.get("is_slave")
                and not r.get("is_sdown")
                and not r.get("is_disconnected")
                and r.get("master-link-status") == "ok"
                for r in replicas
            )
        )

    def _wait_for(
        self,
        condition: Callable[[], bool],
        deadline: float,
        what: str,
        budget: float | None = None,
    ) -> None:
        """Poll a condition until the deadline; TimeoutError with every process's log if not."""
        while not condition():
            if time.monotonic() > deadline:
                processes = [*self._nodes, *([self._sentinel] if self._sentinel else [])]
                raise TimeoutError(
                    f"gave up waiting for {what} after {budget or self.startup_timeout} s:\n"
                    f"{_logs(processes)}"
                )
            time.sleep(POLL_INTERVAL)
