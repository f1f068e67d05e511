"""Issue 18 attacked from the outside, as a platform engineer who runs Redis Cluster,
Sentinel and Azure Managed Redis would try it (breaker18): real ``redis-server`` processes
(a 3 + 3 cluster made with ``redis-cli --cluster create``, a Sentinel set-up, a standalone
server with an Entra-style ACL user), real ``credproxy check`` / ``credproxy run`` /
``credproxy revoke`` processes, the devstack's rotating token endpoint.

Each test here is a fault found that way; they fail on the code they were written against
and say what the README or the issue promises instead:

- configuration mistakes that ``credproxy check`` calls "ok" (standalone mode pointed at a
  cluster node or at a sentinel: every refresh then fails) or reports without naming the
  key to fix (an exception class name only, or a raw traceback);
- Entra ID: a token that expired (a renewal failed for a while) and is valid again later
  leaves the subscription reconnecting ten times a second, each time with a failed AUTH;
- Redis Cluster: once the slot of the events channel moves to another primary (a
  ``--cluster reshard`` / ``rebalance``), every sidecar silently misses every invalidation
  and keeps serving a revoked grant.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from joserfc import jwt
from joserfc.jwk import OctKey

from devstack.procs import Running
from devstack.redisproc import RedisServer
from devstack.redistopo import Node, RedisCluster, RedisSentinel
from devstack.stack import Stack, build_stack
from tests.integration.test_topologies import _faults, _get, _revoke

pytestmark = pytest.mark.integration

ACL = ("credproxy", "s3cret-breaker")
_OP_TIMEOUT = 0.5


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = build_stack(tmp_path_factory.mktemp("brk"), start_proxy=False, keyvault=True,
                    config={"refresh": {"attempts": 1, "timeout": 2.0, "backoff": 0.1}})
    s.config["vault"]["timeout"] = 1.0
    s.write_config()
    s.env["REDIS_PASSWORD"] = ACL[1]
    yield s
    s.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path_factory.mktemp("brk-cluster"), acl=ACL).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinel]:
    sn = RedisSentinel(tmp_path_factory.mktemp("brk-sentinel"), acl=ACL).start()
    try:
        yield sn
    finally:
        sn.stop()


def _cmd(client: redis.Redis, *args: Any) -> Any:
    """One raw command (redis-py leaves execute_command untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _acl_coordination(**extra: Any) -> dict[str, Any]:
    return {"backend": "redis", "username": ACL[0], "password_env": "REDIS_PASSWORD",
            "op_timeout": _OP_TIMEOUT, "key_prefix": "brk:", **extra}


def _check(s: Stack, tmp: Path, coordination: dict[str, Any]) -> tuple[int, str]:
    """``credproxy check`` on the stack's config with this ``coordination``: its exit code
    and everything it printed (stdout + stderr)."""
    path = tmp / f"check-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump({**s.config, "coordination": coordination},
                                   sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config", str(path)],
                          capture_output=True, text=True, env={**os.environ, **s.env},
                          timeout=60)
    return done.returncode, done.stdout + done.stderr


# -- configuration: mistakes `credproxy check` must catch, naming the key ------------------------


def test_check_refuses_standalone_mode_against_a_cluster_node(
        stack: Stack, cluster: RedisCluster, tmp_path: Path) -> None:
    """The issue's own mistake: the URL of a cluster node and no ``mode``. `check` says
    "coordination (redis standalone): ok" and the sidecar is ready, yet every refresh then
    fails (``ClusterCrossSlotError`` / MOVED: the very symptom of issue 18). A cluster node
    says ``cluster_enabled:1`` in INFO: check must refuse and name ``coordination.mode``."""
    code, out = _check(stack, tmp_path, _acl_coordination(url=cluster.url))
    assert code != 0 and "coordination.mode" in out, out


def test_check_refuses_standalone_mode_against_a_sentinel(
        stack: Stack, sentinel: RedisSentinel, tmp_path: Path) -> None:
    """A sentinel's address given as the Redis URL (``mode`` forgotten): `check` says ok
    (a sentinel answers PING), and every refresh of the running sidecar then fails with
    "unknown command 'EVALSHA'". Check must refuse and name ``coordination.mode``."""
    host, port = sentinel.sentinels[0]
    code, out = _check(stack, tmp_path, _acl_coordination(url=f"redis://{host}:{port}"))
    assert code != 0 and "coordination.mode" in out, out


def _mistakes(cluster: RedisCluster, sentinel: RedisSentinel,
              standalone: RedisServer) -> dict[str, tuple[dict[str, Any], str]]:
    """name -> (coordination, the key the error must name)."""
    sentinels = [f"{h}:{p}" for h, p in sentinel.sentinels]
    auth = {"sentinel_username": ACL[0], "sentinel_password_env": "REDIS_PASSWORD"}
    return {
        # today: "redis unreachable: RedisClusterException"
        "cluster mode, standalone server": (
            _acl_coordination(mode="cluster", url=standalone.url.removesuffix("/0")),
            "coordination.mode"),
        # today: "redis unreachable: MasterNotFoundError"
        "sentinel, unknown service_name": (
            _acl_coordination(mode="sentinel", sentinels=sentinels, service_name="nope",
                              **auth), "coordination.service_name"),
        # today: "redis unreachable: ResponseError"
        "sentinels list names a data node": (
            _acl_coordination(mode="sentinel", service_name=sentinel.service_name,
                              sentinels=[str(sentinel.data_nodes[0])], **auth),
            "coordination.sentinels"),
    }


def test_check_names_the_key_for_topology_mistakes(
        stack: Stack, cluster: RedisCluster, sentinel: RedisSentinel,
        tmp_path: Path) -> None:
    """Each mistake fails `check` (it does) with a message that names the key to fix (it
    does not: only the redis-py exception's class name is printed, its text dropped)."""
    standalone = RedisServer(tmp_path / "standalone", acl=ACL).start()
    try:
        unclear = {}
        for name, (coordination, key) in _mistakes(cluster, sentinel, standalone).items():
            code, out = _check(stack, tmp_path, coordination)
            assert code != 0, (name, out)
            if key not in out:
                unclear[name] = out.strip().splitlines()[-1]
        assert unclear == {}, unclear
    finally:
        standalone.stop()


# -- Entra ID ------------------------------------------------------------------------------------


def _entra_token(lifetime: float, oid: str | None = None) -> str:
    """A JWT shaped like an Entra ID access token for Redis (``oid`` = the Redis user;
    None: no ``oid`` claim). Redis never verifies it."""
    now = int(time.time())
    claims: dict[str, Any] = {"aud": "https://redis.azure.com",
                              "iss": "https://sts.windows.net/t/", "iat": now, "nbf": now,
                              "exp": int(now + lifetime), "jti": uuid.uuid4().hex}
    if oid is not None:
        claims["oid"] = oid
    return jwt.encode({"alg": "HS256", "typ": "JWT"}, claims, OctKey.generate_key(256))


def test_check_explains_unusable_entra_tokens(stack: Stack, tmp_path: Path) -> None:
    """An Entra token file that holds no JWT, a token without ``oid`` and an expired one:
    `check` fails (it does) with one line naming ``coordination.entra_id`` and what is
    wrong, never a Python traceback. Today: a raw ``ValueError`` traceback for the first,
    "redis unreachable: DataError" for the second, an unhandled-task traceback plus "redis
    unreachable: AuthenticationError" for the third."""
    oid = str(uuid.uuid4())
    server = RedisServer(tmp_path / "redis", acl=(oid, _entra_token(3600, oid))).start()
    try:
        cases = {"not a JWT": ("garbage\n", "entra_id"),
                 "no oid": (_entra_token(3600), "oid"),
                 "expired": (_entra_token(-60, oid), "expired")}
        bad = {}
        for name, (content, word) in cases.items():
            token_file = tmp_path / f"token-{name.replace(' ', '-')}"
            token_file.write_text(content)
            code, out = _check(stack, tmp_path, {
                "backend": "redis", "url": server.url, "op_timeout": _OP_TIMEOUT,
                "entra_id": {"credential": "file", "token_file": str(token_file)}})
            if code == 0 or "Traceback" in out or word not in out:
                bad[name] = out.strip().splitlines()[-1]
        assert bad == {}, bad
    finally:
        server.stop()


def test_entra_token_valid_again_after_expiry_no_reconnect_storm(
        stack: Stack, tmp_path: Path) -> None:
    """An Entra token that was not renewed in time (the identity endpoint was down) expires;
    Azure then refuses it and closes the connections (here: the ACL password replaced,
    CLIENT KILL). Once a valid token is back (in the file, accepted by Redis), the sidecar
    must settle: the README promises "no reconnect storm". Today its subscription
    reconnects about ten times a second forever, each time with a failed AUTH (WRONGPASS):
    the re-authentication of a new subscription still sends the expired token."""
    s = stack
    oid = str(uuid.uuid4())
    first = _entra_token(4, oid)
    expires = time.time() + 4
    token_file = tmp_path / "redis-token"
    token_file.write_text(first)
    server = RedisServer(tmp_path / "redis", acl=(oid, first)).start()
    admin = redis.Redis(port=server.port, username=oid, password=first,
                        single_connection_client=True, decode_responses=True)
    sidecars: list[Running] = []
    try:
        coordination = {"backend": "redis", "url": server.url, "key_prefix": "be:",
                        "op_timeout": _OP_TIMEOUT,
                        "entra_id": {"credential": "file", "token_file": str(token_file),
                                     "refresh_ratio": 0.5}}
        sidecars = s.start_replicas(1, name="brk-entra",
                                    overrides={"coordination": coordination})
        proxy = str(sidecars[0].info["proxy_url"])
        s.vault_put("be-a", s.grant("be-a", expires_in=0))
        assert _get(s, proxy, "be-a").status_code == 200  # works with the first token
        time.sleep(max(0.0, expires - time.time()) + 0.5)  # not renewed: the file is stale
        # The token expired: Azure refuses it and closes the connections.
        _cmd(admin, "ACL", "SETUSER", oid, "resetpass", ">" + "x" * 32)
        _cmd(admin, "CLIENT", "KILL", "USER", oid, "SKIPME", "yes")
        time.sleep(1.0)
        # A valid token again (the identity endpoint is back), accepted by Redis.
        second = _entra_token(120, oid)
        _cmd(admin, "ACL", "SETUSER", oid, "resetpass", ">" + second)
        token_file.write_text(second)
        time.sleep(3.0)  # time to settle

        def counts() -> tuple[int, int]:
            received = int(admin.info("stats")["total_connections_received"])
            wrongpass = int(admin.info("errorstats").get("errorstat_WRONGPASS",
                                                         {}).get("count", 0))
            return received, wrongpass

        before = counts()
        time.sleep(4.0)
        after = counts()
        s.vault_put("be-b", s.grant("be-b", expires_in=0))
        assert _get(s, proxy, "be-b").status_code == 200  # commands work again
        storm = {"new connections in 4 s": after[0] - before[0],
                 "failed AUTH in 4 s": after[1] - before[1]}
        assert storm["new connections in 4 s"] <= 2 and storm["failed AUTH in 4 s"] == 0, storm
    finally:
        admin.close()
        for r in sidecars:
            r.close()
            s.extra.remove(r)
        server.stop()


# -- Redis Cluster: the events channel's slot moves -------------------------------------------


def _move_slot(cluster: RedisCluster, slot: int) -> tuple[Node, Node]:
    """Move ``slot`` (and its keys) to another primary the way ``redis-cli --cluster
    reshard`` does: SETSLOT IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE everywhere."""
    source = cluster.node_for_slot(slot)
    target = next(p for p in cluster.primaries() if p != source)
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    with cluster.admin(source) as src, cluster.admin(target) as dst:
        _cmd(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        _cmd(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        keys = _cmd(src, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            _cmd(src, "MIGRATE", target.host, target.port, "", 0, 5000,
                                "AUTH2", *ACL, "KEYS", *keys)
    for node in (target, source, *cluster.primaries()):  # the primaries; replicas follow
        with cluster.admin(node) as r:
            _cmd(r, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    return source, target


def _until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def test_revoke_reaches_every_sidecar_after_the_events_slot_moved(
        stack: Stack, cluster: RedisCluster) -> None:
    """A reshard or rebalance moves the slot of the events channel (sharded pub/sub) to
    another primary. The sidecars are not told by any error; a `credproxy revoke` two
    seconds later SPUBLISHes on the new owner and must still reach all three within a
    second (README: "revocation reaches every replica within a second"). Today none of
    them hears it: all three keep serving the revoked grant from memory (30 s and more,
    until the access token expires), and nothing is logged."""
    s = stack
    prefix = f"bm{uuid.uuid4().hex[:6]}:"
    coordination = _acl_coordination(mode="cluster", url=cluster.url, key_prefix=prefix,
                                     nodes=[str(n) for n in cluster.nodes], lock_wait=5)
    s.write_config(coordination=coordination)  # `credproxy revoke` runs on it
    sidecars = s.start_replicas(3, name="brk-cluster")
    try:
        proxies = [str(r.info["proxy_url"]) for r in sidecars]
        user = f"brk-leaver-{uuid.uuid4().hex[:6]}"
        s.vault_put(user, s.grant(user))
        for proxy in proxies:
            assert _get(s, proxy, user).status_code == 200  # cached on every sidecar
        source, target = _move_slot(cluster, cluster.keyslot(f"{prefix}events"))
        assert cluster.node_for_key(f"{prefix}events") == target != source
        time.sleep(2.0)
        _faults(s, revoke_status=503, revoke_count=-1)  # only the invalidation can tell
        try:
            revoked = _revoke(s, "--user", user)
        finally:
            _faults(s, revoke_status=None)
        assert revoked.returncode == 1, revoked.stdout + revoked.stderr
        assert "upstream revocation pending" in revoked.stdout, revoked.stdout
        time.sleep(1.0)
        served = [p for p in proxies if _get(s, p, user).status_code != 401]
        assert served == [], f"{len(served)} of 3 sidecars still serve the revoked grant"
    finally:
        for r in sidecars:
            r.close()
            s.extra.remove(r)
