"""Fake DNS for a test process: real provider host names resolve to a local fake server.

The sandbox the tests run in has no DNS, and the tenant tests need the proxy to talk to
``login.salesforce.com``, ``acme.my.salesforce.com``, ``alice-shop.myshopify.com``... on
port 443, with SNI and Host the real names, exactly as in production. Put this file's
directory on ``PYTHONPATH`` and name the hosts in ``DEVSTACK_FAKE_DNS``; Python imports
``sitecustomize`` at start-up (``site``), and this module then wraps
:func:`socket.getaddrinfo` and :meth:`socket.socket.connect` / ``connect_ex`` in that
process. Nothing changes when the variable is unset or empty.

``DEVSTACK_FAKE_DNS`` holds rules separated by ``;`` (whitespace around them ignored)::

    NAME[,NAME...]=IPV4:PORT[;...]

    login.salesforce.com,*.my.salesforce.com=127.0.0.1:40123;graph.microsoft.com=127.0.0.1:40124

* ``NAME`` is a host name, or ``*.suffix`` for any name below the suffix (any depth, never
  the suffix itself). Names compare case-insensitively, one trailing dot ignored, as DNS
  does (``ACME.my.salesforce.com.`` is ``acme.my.salesforce.com``).
* ``IPV4:PORT`` is where the fake listens. Port **443** of every name in the rule goes
  there; another port of such a name reaches nothing (connection refused), so "ports are
  exact" stays testable. The first rule that names a host wins.
* Every other name resolves as before (``localhost``, IP literals, ...).

How: a faked name resolves to a marker address of its rule, ``127.0.53.<n>`` (n = 1 for
the first rule, ...), with the port asked for; a connect to ``(marker, 443)`` is turned
into a connect to the rule's ``IPV4:PORT``; any other port of a marker is refused
(``ECONNREFUSED``) without touching the network. Rewriting at connect time
(instead of answering the fake's port from getaddrinfo) matters: anyio (httpx2's
backend, credproxy's token, revocation and discovery calls) keeps only the address from
getaddrinfo and connects to the port it was asked for; asyncio (mitmproxy's upstream
connections) and blocking sockets connect to the whole getaddrinfo answer. Both go through
``socket.socket.connect`` (asyncio via ``loop.sock_connect``), so both land on the fake.

Only getaddrinfo is faked (not ``gethostbyname``); it answers IPv4 only (an ``AF_INET6``
lookup of a faked name fails as for a name without AAAA records).
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Any

ENV = "DEVSTACK_FAKE_DNS"
FAKED_PORT = 443
_MARKER_PREFIX = "127.0.53."


@dataclass(frozen=True)
class Rule:
    """One ``NAME[,NAME...]=IPV4:PORT`` entry; ``marker`` is the address its names
    resolve to."""

    names: tuple[str, ...]
    host: str
    port: int
    marker: str

    def matches(self, name: str) -> bool:
        """Whether ``name`` (normalised: lower case, no trailing dot) is one of this
        rule's names."""
        for pattern in self.names:
            if pattern.startswith("*."):
                suffix = pattern[1:]
                if name.endswith(suffix) and len(name) > len(suffix):
                    return True
            elif name == pattern:
                return True
        return False


def normalize(name: str | bytes) -> str:
    """Lower case, one trailing dot dropped (DNS names are case-insensitive and absolute)."""
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    text = text.strip().lower()
    return text[:-1] if text.endswith(".") else text


def parse_rules(spec: str) -> list[Rule]:
    """Read ``DEVSTACK_FAKE_DNS`` (see the module docstring). Raises ValueError naming the
    bad rule."""
    rules: list[Rule] = []
    for raw in spec.split(";"):
        text = raw.strip()
        if not text:
            continue
        names_text, sep, target = text.partition("=")
        host, colon, port_text = target.strip().rpartition(":")
        names = tuple(normalize(n) for n in names_text.split(",") if n.strip())
        if not sep or not colon or not names or not port_text.isdigit():
            raise ValueError(f"{ENV}: {text!r} is not NAME[,NAME...]=IPV4:PORT")
        try:
            socket.inet_aton(host)
        except OSError:
            raise ValueError(f"{ENV}: {host!r} in {text!r} is not an IPv4 address") from None
        for name in names:
            if name.startswith("*.") and name.count(".") < 2:
                raise ValueError(f"{ENV}: {name!r} needs a suffix of two labels or more")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"{ENV}: bad port in {text!r}")
        if len(rules) >= 254:
            raise ValueError(f"{ENV}: at most 254 rules")
        rules.append(Rule(names, host, port, f"{_MARKER_PREFIX}{len(rules) + 1}"))
    return rules


def lookup(rules: list[Rule], name: str | bytes) -> Rule | None:
    """The first rule naming ``name``, or None."""
    normal = normalize(name)
    return next((r for r in rules if r.matches(normal)), None)


def _port_number(port: Any) -> int:
    if port is None:
        return 0
    if isinstance(port, bytes):
        port = port.decode("ascii")
    if isinstance(port, str) and not port.isdigit():
        return socket.getservbyname(port, "tcp")
    return int(port)


def install(rules: list[Rule]) -> None:
    """Wrap getaddrinfo and connect in this process (idempotent per process)."""
    if getattr(socket, "_devstack_fake_dns", None) is not None or not rules:
        return
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    by_marker = {r.marker: r for r in rules}

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0,
                    proto: int = 0, flags: int = 0) -> Any:
        rule = lookup(rules, host) if isinstance(host, str | bytes) and host else None
        if rule is None:
            return real_getaddrinfo(host, port, family, type, proto, flags)
        if flags & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if family not in (socket.AF_UNSPEC, socket.AF_INET):
            raise socket.gaierror(socket.EAI_ADDRFAMILY,
                                  "Address family for hostname not supported")
        protos: dict[int, int] = {socket.SOCK_STREAM: socket.IPPROTO_TCP,
                                  socket.SOCK_DGRAM: socket.IPPROTO_UDP, socket.SOCK_RAW: 0}
        kinds = [int(type)] if type else list(protos)
        number = _port_number(port)
        return [(socket.AF_INET, kind, proto or protos.get(kind, 0), "", (rule.marker, number))
                for kind in kinds]

    def target(address: Any) -> Any:
        """Where a connect to ``address`` really goes; None: refused."""
        if (isinstance(address, tuple) and len(address) == 2
                and isinstance(address[0], str) and address[0] in by_marker):
            rule = by_marker[address[0]]
            return (rule.host, rule.port) if address[1] == FAKED_PORT else None
        return address

    def connect(self: socket.socket, address: Any) -> None:
        where = target(address)
        if where is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        real_connect(self, where)

    def connect_ex(self: socket.socket, address: Any) -> int:
        where = target(address)
        if where is None:
            return errno.ECONNREFUSED
        return int(real_connect_ex(self, where))

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    socket._devstack_fake_dns = rules  # type: ignore[attr-defined]


def _install_from_env() -> None:
    spec = os.environ.get(ENV, "")
    if spec.strip():
        install(parse_rules(spec))


if __name__ == "sitecustomize":  # imported by ``site`` at start-up, not as a library
    _install_from_env()
