"""Which provider, if any, owns a destination; and whether the Host header agrees with it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.errors import UnroutedDenied
from proxy.hosts import HostPattern, parse_authority, path_within
from proxy.settings import ProviderSettings

__all__ = ["Destination", "Route", "Router", "host_agrees", "refuse_retired"]


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


@dataclass(frozen=True, slots=True)
class Route:
    """What a destination belongs to: a provider's own hosts (``resource`` None) or one of
    its resources' (docs/tenants.md: another audience of the same grant)."""

    provider: ProviderSettings
    resource: str | None = None


class Router:
    """Matches destinations to providers by their ``hosts`` patterns (:class:`HostPattern`),
    and their resources' ``hosts``. For a provider that binds its grants to their tenant
    (``grant_hosts``) these patterns are the ceiling: a match says which provider's grant
    to look at; the grant's own hosts decide whether its credential may go there.

    ``retired``: providers a config reload removed (each with only the host patterns that
    no current provider lists any more). Their hosts are not routed, but they are not
    ordinary unrouted hosts either: see :func:`refuse_retired`."""

    def __init__(self, providers: Sequence[ProviderSettings],
                 retired: Sequence[ProviderSettings] = ()) -> None:
        self._patterns = _index(providers)
        self.retired = tuple(retired)
        self._retired = _index(self.retired)

    def match(self, dest: Destination, path: str | None = None) -> Route | None:
        """The provider (and resource) owning ``dest``. A pattern without a port matches
        only the scheme's default port, so a credential never goes to another service on
        the same host. MCP servers sharing one host pattern are told apart by ``path``
        (the request-target): the one whose endpoint it is within; if none, the first
        (which refuses it: ``outside_mcp_resource``)."""
        return _lookup(self._patterns, dest, path)

    def retired_match(self, dest: Destination) -> ProviderSettings | None:
        """The removed provider whose (removed) host pattern matches ``dest``, if any."""
        route = _lookup(self._retired, dest)
        return route.provider if route is not None else None

    def after_reload(self, old: Sequence[ProviderSettings],
                     new: Sequence[ProviderSettings]) -> Router:
        """The router for ``new`` providers replacing ``old``: every host pattern ``old``
        listed and ``new`` does not is retired (added to those retired before); a pattern
        ``new`` lists again is routed again."""
        current = {h for p in new for h in p.ceiling()}
        retired: dict[str, list[str]] = {}
        for p in (*self.retired, *old):
            for h in p.ceiling():
                if h not in current and h not in retired.setdefault(p.id, []):
                    retired[p.id].append(h)
        by_id = {p.id: p for p in (*self.retired, *old)}
        ghosts = [by_id[pid].model_copy(update={"hosts": hosts, "resources": {}})
                  for pid, hosts in retired.items() if hosts]
        return Router(new, ghosts)

    def claims_host(self, host: str) -> bool:
        """Whether any provider lists ``host`` (any port); used to spot Host-header spoofing."""
        return any(pattern.names(host) for pattern, _ in self._patterns)


_Patterns = list[tuple[HostPattern, Route]]


def _index(providers: Sequence[ProviderSettings]) -> _Patterns:
    patterns = [(HostPattern.parse(h), Route(p)) for p in providers for h in p.hosts]
    patterns += [(HostPattern.parse(h), Route(p, rid)) for p in providers
                 for rid, r in p.resources.items() for h in r.hosts]
    # Exact names first, then the longest wildcard suffix: the most specific wins. Equal
    # patterns (MCP servers sharing a host) end up side by side.
    patterns.sort(key=lambda e: (e[0].wildcard, -len(e[0].host), str(e[0])))
    return patterns


def _lookup(patterns: _Patterns, dest: Destination, path: str | None = None
            ) -> Route | None:
    first: tuple[HostPattern, Route] | None = None
    for pattern, route in patterns:
        if first is not None and str(pattern) != str(first[0]):
            break  # only the same pattern's other MCP servers may still claim the path
        if not pattern.matches(dest.host, dest.port, tls=dest.tls):
            continue
        resource = route.provider.mcp_resource if route.resource is None else None
        if resource is None or path is None or path_within(resource, path):
            return route
        first = first or (pattern, route)
    return first[1] if first is not None else None


def refuse_retired(router: Router, dest: Destination) -> None:
    """Refuse an unrouted request to a host that was a provider's until a config reload
    removed it: the agent may still send that provider a credential of its own (a shared
    service account's ``Authorization``), which credproxy must never pass on. Until the
    process restarts (or a reload lists the host again) every request there is refused.

    Raises :class:`proxy.errors.UnroutedDenied` (403 ``unrouted-denied``, reason
    ``provider_removed``) naming the provider."""
    ghost = router.retired_match(dest)
    if ghost is not None:
        raise UnroutedDenied(
            f"{dest} belonged to provider {ghost.id!r}, which a config reload removed; "
            "credproxy does not pass requests there (the agent's own credentials would "
            "reach it). Restore the provider, or restart credproxy to treat the host as "
            "unrouted", reason="provider_removed")


def host_agrees(dest: Destination, host_header: str | None) -> bool:
    """Whether the Host header (or :authority) names the real destination."""
    if not host_header:
        return False
    try:
        host, port = parse_authority(host_header, tls=dest.tls)
    except ValueError:
        return False
    return host == dest.host and port == dest.port
