"""Local Redis topologies for tests: a Redis Cluster (3 primaries, 3 replicas) and a Sentinel
set-up (1 primary, 2 replicas, 3 sentinels), each made of private ``redis-server`` processes
on free ports, in their own directories, without persistence.

Both can lose a primary on purpose (SIGKILL) and wait for the failover, so tests can prove
what a client sees while a shard primary is down and after its replica was promoted::

    with RedisCluster(tmp / "cluster", acl=("app", "pw")).start() as cluster:
        client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url,
                                                             **cluster.client_kwargs())
        victim = cluster.node_for_key("user:1")
        cluster.kill_primary(victim)
        seconds = cluster.wait_failover(victim)

    with RedisSentinel(tmp / "sentinel", acl=("app", "pw")).start() as s:
        sentinel = redis.asyncio.sentinel.Sentinel(
            s.sentinels, sentinel_kwargs=s.sentinel_kwargs(), **s.client_kwargs())
        primary = sentinel.master_for(s.service_name)
        s.kill_primary()
        seconds = s.wait_failover()

Failures are fast on purpose (``cluster-node-timeout`` and ``down-after-milliseconds`` of
1 s): a failover takes about 2-3 s. Replication never touches the disk (see _REPLICATION),
so a restarted server is really empty.

What redis-py 8.1's clients do here (pinned by tests/devstack/test_redistopo.py):

- cluster, primary killed: its slots raise ``redis.ConnectionError`` (each after ~0.5 s of
  the client's own retries) until the replica is promoted; then the client refreshes its
  slot map by itself. The other shards keep answering, some calls slowed by up to ~1 s: for
  the moment between the FAIL flag and the promotion every node answers CLUSTERDOWN
  (``cluster-require-full-coverage yes``, the default), which the client retries.
- cluster, WAIT: ``client.wait()`` goes to the client's default node, not to the last
  write's shard. Put ``WAIT`` in a pipeline with ``target_nodes=`` the key's node.
- cluster, a multi-key EVAL across slots: the client raises ``RedisClusterException``
  itself; a server answers ``ClusterCrossSlotError``.
- sentinel, primary killed: ``redis.ConnectionError`` while the sentinels still name the
  dead primary, then ``MasterNotFoundError`` (a ConnectionError) while they see it down,
  until the promotion; ``master_for`` then follows the new primary.

Admin reads (CLUSTER NODES, INFO, SENTINEL ...) go through short-lived redis-py clients with
the same user and TLS settings the tests' clients use. Nothing here ever connects to a Redis
it did not start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devstack.procs import free_port
from devstack.redisproc import RedisServer

HASH_SLOTS = 16384
HOST = "127.0.0.1"

# Replication without any file: a primary streams its snapshot to the socket at once
# (Redis waits 5 s for more replicas by default) and a replica loads it from the socket (by
# default it writes dump.rdb and would load that file again after a restart: not empty).
_REPLICATION = ("repl-diskless-sync yes", "repl-diskless-sync-delay 0",
                "repl-diskless-load swapdb")


@dataclass(frozen=True, order=True)
class Node:
    """One redis-server of a topology: its client port on 127.0.0.1. The port stays the same
    across restarts, so a Node names the same server for the life of the helper."""

    port: int
    host: str = HOST

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago."""
    seen: set[int] = set()
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in seen:
            seen.add(p)
            ports.append(p)
    return ports


def _poll[T](what: str, check: Callable[[], T | None], timeout: float,
             interval: float = 0.05) -> T:
    """Call ``check`` until it returns something other than None (a redis error counts as
    not yet); raise TimeoutError naming ``what`` and the last error otherwise."""
    deadline = time.monotonic() + timeout
    last: str = ""
    while True:
        try:
            result = check()
        except (redis.RedisError, OSError) as e:
            result, last = None, f" (last error: {type(e).__name__}: {e})"
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:.1f} s{last}")
        time.sleep(interval)


def _require_client_auth(cert_path: Path) -> None:
    """A TLS cluster bus accepts only peers with a client certificate (Redis accepts bus
    connections with TLS_CLIENT_AUTH_YES whatever ``tls-auth-clients`` says) and each node
    presents its own: without clientAuth the nodes never meet and ``redis-cli --cluster
    create`` waits forever. Raise ValueError early instead."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no EKU: any purpose
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise ValueError(f"{cert_path}: a TLS Redis Cluster needs a certificate with the "
                         "clientAuth usage too (make_leaf(..., client_auth=True))")


def _command(client: redis.Redis, *args: str | bytes) -> Any:
    """One command, its reply as the server gave it (a multi-word name passed as separate
    words has no redis-py reply parser: CLUSTER NODES stays text)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _master_addr(client: redis.Redis, service: str) -> Node | None:
    """SENTINEL GET-MASTER-ADDR-BY-NAME: the primary a sentinel reports, if any."""
    addr = _command(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", service)
    return Node(int(addr[1]), str(addr[0])) if addr else None


class _Topology:
    """What the cluster and the sentinel helpers share: processes, credentials, admin
    clients, stop()."""

    def __init__(self, workdir: Path, tls: tuple[Path, Path, Path] | None,
                 acl: tuple[str, str] | None) -> None:
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not installed")
        self.workdir = workdir
        self.tls = tls
        self.acl = acl
        self._servers: dict[int, RedisServer] = {}

    # -- clients ------------------------------------------------------------------------

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any redis-py client of these servers (``redis.Redis``,
        ``redis.asyncio.cluster.RedisCluster``, ``Sentinel.master_for``): the ACL user and
        the TLS trust anchor, or nothing."""
        kwargs: dict[str, Any] = {}
        if self.acl:
            kwargs["username"], kwargs["password"] = self.acl
        if self.tls:
            kwargs["ssl"] = True
            kwargs["ssl_ca_certs"] = str(self.tls[2])
        return kwargs

    @contextmanager
    def admin(self, node: Node, timeout: float = 2.0) -> Iterator[redis.Redis]:
        """A short-lived synchronous client of one server (decoded strings)."""
        client = redis.Redis(host=node.host, port=node.port, socket_timeout=timeout,
                             socket_connect_timeout=timeout, decode_responses=True,
                             retry=Retry(NoBackoff(), 0), **self.client_kwargs())
        try:
            yield client
        finally:
            client.close()

    def _info(self, node: Node, section: str) -> dict[str, Any]:
        with self.admin(node) as r:
            return dict(r.info(section))

    # -- processes ----------------------------------------------------------------------

    def alive(self, node: Node) -> bool:
        server = self._servers.get(node.port)
        return bool(server and server.proc and server.proc.poll() is None)

    def _server(self, node: Node) -> RedisServer:
        return self._servers[node.port]

    def _kill(self, node: Node) -> None:
        self._server(node).kill()

    def pids(self) -> list[int]:
        """The process ids of the running servers (for leak checks)."""
        return [s.proc.pid for s in self._servers.values()
                if s.proc is not None and s.proc.poll() is None]

    def stop(self) -> None:
        """SIGTERM every server at once, then wait (SIGKILL after 5 s). Idempotent."""
        running = [s for s in self._servers.values()
                   if s.proc is not None and s.proc.poll() is None]
        for s in running:
            assert s.proc is not None
            with suppress(ProcessLookupError):
                s.proc.terminate()
        for s in running:
            s.stop()  # waits; kills what did not end in time


class RedisCluster(_Topology):
    """A Redis Cluster of ``primaries`` primaries with ``replicas_per_primary`` replicas each
    (default 3 + 3), created with ``redis-cli --cluster create``.

    ``tls`` = (cert, key, ca): clients, the cluster bus (``tls-cluster``) and replication
    (``tls-replication``) all speak TLS; the bus demands client certificates, so ``cert``
    must carry clientAuth as well as serverAuth (ValueError otherwise). ``acl`` = (user,
    password): the only user (the default user is off); replicas authenticate to their
    primary with it (``masteruser`` / ``masterauth``) and so does ``redis-cli --cluster
    create``. The cluster bus itself has no password in Redis (only TLS client
    certificates). Each node has its own directory with its config file and its
    ``nodes-<port>.conf`` (the cluster state Redis keeps across restarts; keys are never
    kept).
    """

    def __init__(self, workdir: Path, *, primaries: int = 3, replicas_per_primary: int = 1,
                 node_timeout_ms: int = 1000, tls: tuple[Path, Path, Path] | None = None,
                 acl: tuple[str, str] | None = None) -> None:
        super().__init__(workdir, tls, acl)
        if tls is not None:
            _require_client_auth(tls[0])
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        self.replicas_per_primary = replicas_per_primary
        self.node_timeout_ms = node_timeout_ms
        count = primaries * (1 + replicas_per_primary)
        ports = _free_ports(2 * count)
        self.nodes: list[Node] = [Node(p) for p in ports[:count]]
        self._bus_ports = dict(zip(ports[:count], ports[count:], strict=True))
        for node in self.nodes:
            self._servers[node.port] = RedisServer(
                self._node_dir(node), node.port, tls=tls, acl=acl, extra=self._lines(node))
        self._killed: dict[Node, tuple[float, str, list[str]]] = {}

    # -- set-up -------------------------------------------------------------------------

    def _node_dir(self, node: Node) -> Path:
        return self.workdir / f"node-{node.port}"

    def _lines(self, node: Node) -> list[str]:
        lines = ["cluster-enabled yes", f"cluster-config-file nodes-{node.port}.conf",
                 f"cluster-node-timeout {self.node_timeout_ms}",
                 f"cluster-port {self._bus_ports[node.port]}",
                 # A replica may always take over, however long it was cut off (the default
                 # factor 10 can leave a shard without a primary after a long partition).
                 "cluster-replica-validity-factor 0",
                 *_REPLICATION]
        if self.acl:
            user, password = self.acl
            lines += [f"masteruser {user}", f"masterauth {password}"]
        if self.tls:
            lines += ["tls-cluster yes", "tls-replication yes"]
        return lines

    def start(self, timeout: float = 60.0) -> RedisCluster:
        """Start every node, create the cluster and wait until it serves every slot and
        every replica is in sync. Stops what it started if any step fails."""
        try:
            for node in self.nodes:
                self._server(node).start()
            self._create(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, timeout: float) -> None:
        argv = ["redis-cli", "--cluster", "create", *(str(n) for n in self.nodes),
                "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"]
        env = dict(os.environ)
        env.pop("REDISCLI_AUTH", None)
        if self.tls:
            argv += ["--tls", "--cacert", str(self.tls[2])]
        if self.acl:
            user, password = self.acl
            argv += ["--user", user]
            env["REDISCLI_AUTH"] = password  # not on the command line (ps)
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Until every running node says ``cluster_state:ok`` with all 16384 slots ok and
        knows every node, all of them agree on which primary serves which slots and on each
        node's role, every running node is healthy in that view, and every running replica's
        link to its primary is up (its data synced). Returns the seconds waited.

        (A node restarted with its ``nodes-<port>.conf`` says ``cluster_state:ok`` at once,
        from its own stale view; the agreement check waits until it learned the truth.)"""
        started = time.monotonic()
        live = [n for n in self.nodes if self.alive(n)]

        def ready() -> bool | None:
            layouts = set()
            for node in live:
                with self.admin(node) as r:
                    info = r.cluster("info")
                    if (info.get("cluster_state") != "ok"
                            or int(info.get("cluster_slots_ok", 0)) != HASH_SLOTS
                            or int(info.get("cluster_known_nodes", 0)) != len(self.nodes)):
                        return None
                    repl = r.info("replication")
                    if repl["role"] == "slave" and repl.get("master_link_status") != "up":
                        return None
                view = self._view(node)
                by_node = {e.node: e for e in view}
                if any(n not in by_node or not by_node[n].healthy for n in live):
                    return None
                role = "master" if repl["role"] == "master" else "slave"
                if role not in by_node[node].flags:
                    return None  # its own view and INFO disagree: still settling
                layouts.add(frozenset((e.id, e.node, "master" in e.flags, e.master_id,
                                       e.slots) for e in view))
            return True if len(layouts) == 1 else None

        _poll("cluster ready", ready, timeout)
        return time.monotonic() - started

    # -- topology -------------------------------------------------------------------------

    def _view(self, via: Node | None = None) -> list[_Entry]:
        """CLUSTER NODES as one running node sees it."""
        candidates = [via] if via else [n for n in self.nodes if self.alive(n)]
        last: Exception | None = None
        for node in candidates:
            try:
                with self.admin(node) as r:
                    text = _command(r, "CLUSTER", "NODES")
            except (redis.RedisError, OSError) as e:
                last = e
                continue
            if isinstance(text, bytes):
                text = text.decode()
            return [_Entry.parse(line) for line in str(text).splitlines() if line.strip()]
        raise RuntimeError(f"no cluster node answers CLUSTER NODES: {last}")

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, e.g. for ``[ClusterNode(h, p) for h, p in ...]``."""
        return [n.address for n in self.nodes]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>`` (``rediss`` with TLS) of the first node; redis-py's
        cluster client discovers the others from it. No credentials (client_kwargs)."""
        return f"{'rediss' if self.tls else 'redis'}://{self.nodes[0]}"

    def primaries(self) -> list[Node]:
        """The primaries that serve slots now and are not flagged as failing."""
        return sorted(e.node for e in self._view() if e.is_primary and e.slots and e.healthy)

    def replicas(self) -> list[Node]:
        """The replicas now, not flagged as failing."""
        return sorted(e.node for e in self._view() if e.is_replica and e.healthy)

    def replicas_of(self, primary: Node) -> list[Node]:
        """The healthy replicas that follow ``primary`` now."""
        view = self._view()
        ids = {e.node: e.id for e in view}
        return sorted(e.node for e in view
                      if e.is_replica and e.healthy and e.master_id == ids.get(primary))

    def keyslot(self, key: str | bytes) -> int:
        """The key's hash slot, computed by a server (CLUSTER KEYSLOT)."""
        for node in self.nodes:
            if self.alive(node):
                with self.admin(node) as r:
                    return int(_command(r, "CLUSTER", "KEYSLOT", key))
        raise RuntimeError("no cluster node is running")

    def node_for_slot(self, slot: int) -> Node:
        """The primary that serves ``slot`` (0-16383) now; LookupError if no healthy one
        does (between a primary's death and its replica's promotion)."""
        for entry in self._view():
            if entry.is_primary and entry.healthy and any(a <= slot <= b
                                                          for a, b in entry.slots):
                return entry.node
        raise LookupError(f"no healthy primary serves slot {slot}")

    def node_for_key(self, key: str | bytes) -> Node:
        """The primary that serves ``key``'s slot now (LookupError if none does)."""
        return self.node_for_slot(self.keyslot(key))

    def node_id(self, node: Node) -> str:
        """The 40-hex cluster node id ``node`` has now (new after restart_all)."""
        with self.admin(node) as r:
            return str(_command(r, "CLUSTER", "MYID"))

    # -- faults ---------------------------------------------------------------------------

    def kill_primary(self, node: Node | None = None) -> Node:
        """SIGKILL a primary (default: the one serving slot 0). Its replica takes over after
        ``cluster-node-timeout`` plus an election (see wait_failover). Returns the node."""
        node = node or self.node_for_slot(0)
        view = self._view()
        entry = next((e for e in view if e.node == node), None)
        if entry is None or not entry.is_primary or not entry.slots:
            raise ValueError(f"{node} is not a primary serving slots")
        replicas = [e.id for e in view if e.master_id == entry.id and e.healthy]
        self._kill(node)
        self._killed[node] = (time.monotonic(), entry.id, replicas)
        return node

    def wait_failover(self, node: Node, timeout: float = 30.0) -> float:
        """Until a replica of the killed primary ``node`` is a primary serving slots, the
        dead node is flagged ``fail`` and every running node says ``cluster_state:ok`` with
        all slots ok. Returns the seconds since kill_primary."""
        if node not in self._killed:
            raise ValueError(f"{node} was not killed with kill_primary")
        killed_at, dead_id, replica_ids = self._killed[node]
        if not replica_ids:
            raise RuntimeError(f"{node} had no healthy replica: no failover will happen")

        def promoted() -> bool | None:
            for live in self.nodes:
                if not self.alive(live):
                    continue
                view = self._view(live)
                by_id = {e.id: e for e in view}
                dead = by_id.get(dead_id)
                if dead is None or "fail" not in dead.flags:
                    return None
                if not any(by_id[i].is_primary and by_id[i].slots
                           for i in replica_ids if i in by_id):
                    return None
                with self.admin(live) as r:
                    info = r.cluster("info")
                if (info.get("cluster_state") != "ok"
                        or int(info.get("cluster_slots_ok", 0)) != HASH_SLOTS):
                    return None
            return True

        _poll(f"failover of {node}", promoted, timeout)
        del self._killed[node]
        return time.monotonic() - killed_at

    def restart_node(self, node: Node, timeout: float = 30.0) -> float:
        """Kill ``node`` if it runs and start it again, EMPTY (no persistence) but with its
        ``nodes-<port>.conf``: it keeps its node id and rejoins the cluster by itself.

        A former primary whose slots a replica took over (wait_failover) comes back as a
        replica of that new primary and resyncs its data from it. A primary restarted before
        the cluster noticed it was gone keeps its slots and comes back as an EMPTY primary:
        that shard lost its data (and its replica resyncs to the empty set), like a
        standalone Redis restart. Waits until the cluster is ready again (wait_ready);
        returns the seconds from the restart to then."""
        server = self._server(node)
        server.kill()
        started = time.monotonic()
        server.start()
        self.wait_ready(timeout)
        return time.monotonic() - started

    def restart_all(self, timeout: float = 60.0, *, keep_config: bool = False) -> float:
        """A whole-cluster restart with data loss: every node SIGKILLed and started again
        EMPTY. By default their cluster state is deleted too and the cluster is created anew
        (new node ids, primaries and replicas possibly on other ports). With
        ``keep_config``, each node keeps its ``nodes-<port>.conf`` and the cluster forms
        again by itself with the same ids and slots, empty. Returns the seconds from the
        kill until the cluster is ready again."""
        started = time.monotonic()
        for node in self.nodes:
            self._server(node).kill()
        self._killed.clear()
        if not keep_config:
            for node in self.nodes:
                (self._node_dir(node) / f"nodes-{node.port}.conf").unlink(missing_ok=True)
        try:
            for node in self.nodes:
                self._server(node).start()
            if keep_config:
                self.wait_ready(timeout)
            else:
                self._create(timeout)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True)
class _Entry:
    """One line of CLUSTER NODES."""

    id: str
    node: Node
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, line: str) -> _Entry:
        # <id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
        fields = line.split()
        addr = fields[1].split("@", 1)[0]
        host, _, port = addr.rpartition(":")
        slots: list[tuple[int, int]] = []
        for item in fields[8:]:
            if item.startswith("["):
                continue  # a slot being imported or migrated
            a, _, b = item.partition("-")
            slots.append((int(a), int(b or a)))
        return cls(fields[0], Node(int(port), host or HOST), frozenset(fields[2].split(",")),
                   None if fields[3] == "-" else fields[3], tuple(slots))

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def is_replica(self) -> bool:
        return "slave" in self.flags

    @property
    def healthy(self) -> bool:
        return not self.flags & {"fail", "fail?", "noaddr", "handshake"}


class RedisSentinel(_Topology):
    """One primary with ``replicas`` replicas (``replicaof``) watched by ``sentinels``
    sentinels (``sentinel monitor <service_name> 127.0.0.1 <port> <quorum>``).

    ``acl`` = (user, password) is the only user on every server, the sentinels included:
    replicas authenticate with it (``masteruser``), the sentinels to the data nodes
    (``sentinel auth-user``) and to each other (``sentinel sentinel-user``); a client gives
    it to both the Sentinel object (``sentinel_kwargs``) and master_for (client_kwargs).
    ``tls`` = (cert, key, ca): every server, the sentinels included, serves TLS only and
    replicates over TLS. Each sentinel rewrites its own config file in its own directory.
    """

    def __init__(self, workdir: Path, *, replicas: int = 2, sentinels: int = 3,
                 quorum: int = 2, service_name: str = "credproxy",
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                 tls: tuple[Path, Path, Path] | None = None,
                 acl: tuple[str, str] | None = None) -> None:
        super().__init__(workdir, tls, acl)
        self.service_name = service_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        ports = _free_ports(1 + replicas + sentinels)
        self.data_nodes: list[Node] = [Node(p) for p in ports[:1 + replicas]]
        self.sentinel_nodes: list[Node] = [Node(p) for p in ports[1 + replicas:]]
        self._first_primary = self.data_nodes[0]
        self._killed: tuple[Node, float] | None = None
        for node in self.data_nodes:
            self._servers[node.port] = RedisServer(self.workdir / f"redis-{node.port}",
                                                   node.port, tls=tls, acl=acl)
        for node in self.sentinel_nodes:
            self._servers[node.port] = RedisServer(
                self.workdir / f"sentinel-{node.port}", node.port, tls=tls, acl=acl,
                extra=self._sentinel_lines(), sentinel=True)

    # -- set-up -------------------------------------------------------------------------

    def _data_lines(self, replica_of: Node | None) -> list[str]:
        lines = list(_REPLICATION)
        if self.acl:
            user, password = self.acl
            lines += [f"masteruser {user}", f"masterauth {password}"]
        if self.tls:
            lines.append("tls-replication yes")
        if replica_of is not None:
            lines.append(f"replicaof {replica_of.host} {replica_of.port}")
        return lines

    def _sentinel_lines(self) -> list[str]:
        name = self.service_name
        p = self._first_primary
        lines = [f"sentinel monitor {name} {p.host} {p.port} {self.quorum}",
                 f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                 f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                 f"sentinel parallel-syncs {name} 1"]
        if self.acl:
            user, password = self.acl
            lines += [f"sentinel auth-user {name} {user}", f"sentinel auth-pass {name} {password}",
                      f"sentinel sentinel-user {user}", f"sentinel sentinel-pass {password}"]
        if self.tls:
            lines.append("tls-replication yes")  # sentinels reach the data nodes over TLS
        return lines

    def start(self, timeout: float = 30.0) -> RedisSentinel:
        """Start the primary, the replicas (until in sync), then the sentinels (until each
        knows both replicas and the other sentinels). Stops what it started on failure."""
        try:
            first = self._first_primary
            for node in self.data_nodes:
                server = self._server(node)
                server.extra = self._data_lines(None if node == first else first)
                server.start()
            for node in self.data_nodes[1:]:
                self._wait_synced(node, first, timeout)
            for node in self.sentinel_nodes:
                self._server(node).start()
            self._wait_sentinels(first, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_synced(self, replica: Node, primary: Node, timeout: float) -> None:
        def synced() -> bool | None:
            repl = self._info(replica, "replication")
            ok = (repl["role"] == "slave" and int(repl["master_port"]) == primary.port
                  and repl.get("master_link_status") == "up")
            return True if ok else None

        _poll(f"{replica} in sync with {primary}", synced, timeout)

    def _wait_sentinels(self, primary: Node, timeout: float) -> None:
        replicas = len(self.data_nodes) - 1
        others = len(self.sentinel_nodes) - 1

        def known() -> bool | None:
            for node in self.sentinel_nodes:
                if not self.alive(node):
                    continue
                with self.admin(node) as r:
                    reply = _command(r, "SENTINEL", "MASTER", self.service_name)
                # A map (RESP3, redis-py 8's default) or flat pairs (RESP2).
                state = (dict(reply) if isinstance(reply, dict)
                         else dict(zip(reply[::2], reply[1::2], strict=True)))
                if (int(state["port"]) != primary.port
                        or state["flags"] != "master"
                        or int(state["num-slaves"]) < replicas
                        or int(state["num-other-sentinels"]) < others):
                    return None
            return True

        _poll("sentinels know the set-up", known, timeout)

    # -- topology -------------------------------------------------------------------------

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """(host, port) of every sentinel, for ``redis.asyncio.sentinel.Sentinel``."""
        return [n.address for n in self.sentinel_nodes]

    def sentinel_kwargs(self) -> dict[str, Any]:
        """``sentinel_kwargs`` for redis-py's Sentinel: how to reach the sentinels
        themselves (the same user and TLS as the data nodes)."""
        return self.client_kwargs()

    def primary(self) -> Node:
        """The primary the first answering sentinel reports now."""
        def ask() -> Node | None:
            for node in self.sentinel_nodes:
                if not self.alive(node):
                    continue
                with suppress(redis.RedisError, OSError), self.admin(node) as r:
                    addr = _master_addr(r, self.service_name)
                    if addr:
                        return addr
            return None

        return _poll("a sentinel reports the primary", ask, 10.0)

    def replicas(self) -> list[Node]:
        """The data nodes that run and are replicas now (INFO replication)."""
        out = []
        for node in self.data_nodes:
            if self.alive(node):
                with suppress(redis.RedisError, OSError):
                    if self._info(node, "replication")["role"] == "slave":
                        out.append(node)
        return out

    # -- faults ---------------------------------------------------------------------------

    def kill_primary(self) -> Node:
        """SIGKILL the current primary; returns it. See wait_failover."""
        node = self.primary()
        self._kill(node)
        self._killed = (node, time.monotonic())
        return node

    def wait_failover(self, timeout: float = 30.0) -> float:
        """Until every running sentinel reports a new primary (not the killed one) and that
        primary says ``role:master`` and accepts a write. Returns the seconds since
        kill_primary."""
        if self._killed is None:
            raise ValueError("no primary was killed with kill_primary")
        dead, killed_at = self._killed

        def promoted() -> Node | None:
            seen: set[Node] = set()
            for node in self.sentinel_nodes:
                if not self.alive(node):
                    continue
                with self.admin(node) as r:
                    addr = _master_addr(r, self.service_name)
                if not addr:
                    return None
                seen.add(addr)
            if len(seen) != 1 or dead in seen:
                return None
            (new,) = seen
            with self.admin(new) as r:
                if r.info("replication")["role"] != "master":
                    return None
                r.set("devstack:redistopo:failover", str(time.time()))
            return new

        _poll("sentinel failover", promoted, timeout)
        self._killed = None
        return time.monotonic() - killed_at

    def restart_node(self, node: Node, timeout: float = 30.0) -> float:
        """Kill the data node ``node`` if it runs and start it again EMPTY as a replica of
        the current primary (as its config would say after Sentinel rewrote it), until it is
        in sync and the sentinels list it again. Returns the seconds it took."""
        if node not in self.data_nodes:
            raise ValueError(f"{node} is not a data node")
        primary = self.primary()
        if primary == node:
            raise ValueError(f"{node} is the primary: kill_primary and wait_failover first")
        started = time.monotonic()
        server = self._server(node)
        server.kill()
        server.extra = self._data_lines(primary)
        server.start()
        self._wait_synced(node, primary, timeout)
        return time.monotonic() - started

    def __enter__(self) -> RedisSentinel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


__all__ = ["HASH_SLOTS", "Node", "RedisCluster", "RedisSentinel"]
