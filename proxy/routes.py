"""Which provider, if any, owns a destination; and whether the Host header agrees with it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxy.settings import ProviderSettings


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a request really goes: the CONNECT authority / SNI / absolute-form authority."""

    host: str  # normalised by normalize_host
    port: int
    tls: bool

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.tls else 80)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def normalize_host(host: str) -> str:
    """Lower-case, drop one trailing dot, canonicalise IP literals. Raises ValueError when the
    value cannot be a host (userinfo, spaces, empty labels)."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        return f"[{ipaddress.IPv6Address(h[1:-1])}]"
    h = h.lower()
    if h.endswith("."):
        h = h[:-1]
    if h.endswith("."):
        raise ValueError("not a host name")
    if not h or any(c in h for c in "@/\\ \t?#%[]") or ".." in h or h.startswith("."):
        raise ValueError("not a host name")
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return h.encode("idna").decode("ascii") if not h.isascii() else h
    return f"[{ip}]" if ip.version == 6 else str(ip)


def parse_authority(value: str, *, tls: bool) -> tuple[str, int]:
    """Parse a Host header / authority into (normalised host, port). Raises ValueError."""
    v = value.strip()
    if not v or "@" in v:
        raise ValueError("authority must not be empty or carry userinfo")
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise ValueError("unterminated IPv6 literal")
        host, rest = v[: end + 1], v[end + 1:]
        port_s = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    else:
        host, sep, port_s_ = v.rpartition(":")
        if not sep:
            host, port_s = v, None
        else:
            port_s = port_s_
    if port_s is not None and (not (port_s.isascii() and port_s.isdigit()) or
                               not 0 < int(port_s) < 65536):
        raise ValueError("bad port")
    port = int(port_s) if port_s is not None else (443 if tls else 80)
    return normalize_host(host), port


class Router:
    """Matches destinations to providers by their ``hosts`` patterns."""

    def __init__(self, providers: list[ProviderSettings]) -> None:
        self._exact: dict[tuple[str, int | None], ProviderSettings] = {}
        self._wild: list[tuple[str, int | None, ProviderSettings]] = []
        for p in providers:
            for pattern in p.hosts:
                host, port = _split(pattern)
                if host.startswith("*."):
                    self._wild.append((host[1:], port, p))  # keeps the leading dot
                else:
                    self._exact[(host, port)] = p
        # Longest suffix first, so the most specific wildcard wins.
        self._wild.sort(key=lambda w: -len(w[0]))

    def match(self, dest: Destination) -> ProviderSettings | None:
        """The provider owning ``dest``. A pattern without a port matches only the scheme's
        default port, so a credential never goes to another service on the same host."""
        p = self._exact.get((dest.host, dest.port))
        if p is None and dest.default_port:
            p = self._exact.get((dest.host, None))
        if p is not None:
            return p
        for suffix, port, prov in self._wild:
            if dest.host.endswith(suffix) and len(dest.host) > len(suffix):
                if port == dest.port or (port is None and dest.default_port):
                    return prov
        return None

    def claims_host(self, host: str) -> bool:
        """Whether any provider lists ``host`` (any port); used to spot Host-header spoofing."""
        return any(
            self.match(Destination(host, port, tls))
            for port, tls in ((443, True), (80, False))
        ) or any(h == host for h, _ in self._exact)


def host_agrees(dest: Destination, host_header: str | None) -> bool:
    """Whether the Host header (or :authority) names the real destination."""
    if not host_header:
        return False
    try:
        host, port = parse_authority(host_header, tls=dest.tls)
    except ValueError:
        return False
    return host == dest.host and port == dest.port


def _split(pattern: str) -> tuple[str, int | None]:
    if pattern.startswith("["):
        host, _, rest = pattern.partition("]")
        return host + "]", int(rest[1:]) if rest else None
    host, sep, port = pattern.partition(":")
    return host, int(port) if sep else None
