"""Which provider, if any, owns a destination; and whether the Host header agrees with it."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.hosts import HostPattern, parse_authority
from proxy.settings import ProviderSettings

__all__ = ["Destination", "Router", "host_agrees"]


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


class Router:
    """Matches destinations to providers by their ``hosts`` patterns (:class:`HostPattern`)."""

    def __init__(self, providers: list[ProviderSettings]) -> None:
        self._patterns: list[tuple[HostPattern, ProviderSettings]] = [
            (HostPattern.parse(h), p) for p in providers for h in p.hosts]
        # Exact names first, then the longest wildcard suffix: the most specific wins.
        self._patterns.sort(key=lambda e: (e[0].wildcard, -len(e[0].host)))

    def match(self, dest: Destination) -> ProviderSettings | None:
        """The provider owning ``dest``. A pattern without a port matches only the scheme's
        default port, so a credential never goes to another service on the same host."""
        for pattern, provider in self._patterns:
            if pattern.matches(dest.host, dest.port, tls=dest.tls):
                return provider
        return None

    def claims_host(self, host: str) -> bool:
        """Whether any provider lists ``host`` (any port); used to spot Host-header spoofing."""
        return any(pattern.names(host) for pattern, _ in self._patterns)


def host_agrees(dest: Destination, host_header: str | None) -> bool:
    """Whether the Host header (or :authority) names the real destination."""
    if not host_header:
        return False
    try:
        host, port = parse_authority(host_header, tls=dest.tls)
    except ValueError:
        return False
    return host == dest.host and port == dest.port
