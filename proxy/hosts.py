"""One grammar for hosts: parse, normalise, match, and render for mitmproxy's ``allow_hosts``.

Routing (:mod:`proxy.routes`), settings validation (:mod:`proxy.settings`) and the
``unrouted: tunnel`` intercept list all go through this module, so they cannot disagree about
what a host is (an IPv6 provider once matched in routing but never in the intercept list).

* A **host** is normalised by :func:`normalize_host`: lower case, one trailing dot dropped,
  IDNA for non-ASCII names, IP literals canonical (IPv6 in brackets, RFC 5952 form; an
  IPv4-mapped IPv6 address and the numeric IPv4 spellings the system resolver accepts,
  such as ``127.1``, as the dotted quad they reach).
* An **authority** (RFC 9110 section 4.2.3, RFC 3986 section 3.2: ``host[:port]``) is read by
  :func:`parse_authority`; userinfo is refused.
* A **host pattern** (a provider's ``hosts`` entry) is ``name``, ``name:port``, ``*.suffix``
  (any depth below the suffix, never the suffix itself) or an IP literal, with an optional
  port; see :class:`HostPattern`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_NUMERIC = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}$")


def _numeric_ipv4(host: str) -> str | None:
    """The dotted quad a numeric host spelling names for the system resolver, which reads
    ``127.1``, ``2130706433``, ``0x7f000001`` and ``0177.0.0.1`` with inet_aton (POSIX
    ``inet_addr`` forms): these connect to 127.0.0.1, so they must route as 127.0.0.1."""
    if not _NUMERIC.match(host):
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def normalize_host(host: str) -> str:
    """Lower-case, drop one trailing dot, canonicalise IP literals. Raises ValueError when the
    value cannot be a host (userinfo, spaces, empty labels)."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        return _ip_text(ipaddress.IPv6Address(h[1:-1]))
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
        numeric = _numeric_ipv4(h)
        if numeric is not None:
            return _ip_text(ipaddress.IPv4Address(numeric))
        return h.encode("idna").decode("ascii") if not h.isascii() else h
    return _ip_text(ip)


def _ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Canonical text of an address: IPv6 in brackets (RFC 5952), an IPv4-mapped IPv6
    address as the IPv4 address it reaches. The unspecified address (``0.0.0.0``, ``::``)
    is no destination (connecting to it reaches this host's loopback on Linux): ValueError."""
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped
                             is not None and ip.ipv4_mapped.is_unspecified):
        raise ValueError("the unspecified address is not a destination")
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else f"[{ip}]"
    return str(ip)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError("bad port")
    return int(text)


def _split_authority(value: str) -> tuple[str, str | None]:
    """``host[:port]`` -> (host text, port text or None); IPv6 literals in brackets."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError("unterminated IPv6 literal")
        host, rest = value[: end + 1], value[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError("bad port")
        return host, rest[1:] if rest else None
    host, sep, port = value.rpartition(":")
    return (host, port) if sep else (value, None)


def parse_authority(value: str, *, tls: bool) -> tuple[str, int]:
    """Parse a Host header / request-target authority into (normalised host, port); the port
    defaults to the scheme's (443 with ``tls``, else 80). Raises ValueError."""
    v = value.strip()
    if not v or "@" in v:
        raise ValueError("authority must not be empty or carry userinfo")
    host, port = _split_authority(v)
    return normalize_host(host), _port(port) if port is not None else (443 if tls else 80)


@dataclass(frozen=True, slots=True)
class HostPattern:
    """A provider's ``hosts`` entry, normalised.

    ``host`` is a normalised host (:func:`normalize_host`) or ``*.suffix``; ``port`` is None
    for "the scheme's default port only" (443, or 80 for plain http).
    """

    host: str
    port: int | None = None

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")

    @classmethod
    def parse(cls, pattern: str) -> HostPattern:
        """Read a ``hosts`` entry. Raises ValueError naming what is wrong ("bad port",
        "not a host name, IP or *.suffix", "a wildcard needs a suffix of two labels")."""
        raw = pattern.strip().lower()
        bracketed = raw.startswith("[")
        if bracketed or raw.count(":") == 1:
            try:
                host, port_text = _split_authority(raw)
                port = _port(port_text) if port_text is not None else None
            except ValueError:
                raise ValueError(f"{pattern!r}: bad port") from None
            if bracketed:
                host = host[1:-1]
        else:
            host, port = raw, None  # a bare IPv6 literal has several colons
        if host.endswith("."):
            host = host[:-1]
        try:
            ip = ipaddress.ip_address(_numeric_ipv4(host) or host)
        except ValueError:
            if bracketed:
                raise ValueError(f"{pattern!r}: not an IPv6 literal") from None
            labels = host.removeprefix("*.").split(".")
            if not all(_HOST_LABEL.match(label) for label in labels):
                raise ValueError(f"{pattern!r}: not a host name, IP or *.suffix") from None
            if host.startswith("*.") and len(labels) < 2:
                raise ValueError(
                    f"{pattern!r}: a wildcard needs a suffix of two labels or more") from None
            return cls(host, port)
        return cls(_ip_text(ip), port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" if self.port is not None else self.host

    def matches(self, host: str, port: int, *, tls: bool) -> bool:
        """Whether a normalised ``host`` on ``port`` is this pattern's. A pattern without a
        port matches only the scheme's default port, so a credential never goes to another
        service on the same host."""
        if port != (self.port if self.port is not None else (443 if tls else 80)):
            return False
        if self.wildcard:
            suffix = self.host[1:]  # keeps the leading dot: "*.b.c" never matches "b.c"
            return host.endswith(suffix) and len(host) > len(suffix)
        return host == self.host

    def names(self, host: str) -> bool:
        """Whether ``host`` (normalised) is this pattern's host on any port."""
        if self.wildcard:
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def intercept_regex(self) -> str:
        """A regex for mitmproxy's ``allow_hosts``, which searches ``host:port`` strings made
        from the CONNECT address (IPv6 without brackets), the SNI and the Host header,
        case-insensitively (mitmproxy/addons/next_layer.py ``_ignore_connection``). A pattern
        without a port intercepts 443 and 80. An IPv6 provider is matched in its canonical
        spelling, with or without brackets; another spelling is tunnelled (no credential)."""
        if self.wildcard:
            rx = r"(?:[^.:\[\]]+\.)+" + re.escape(self.host[2:]) + r"\.?"
        elif self.host.startswith("["):
            rx = r"\[?" + re.escape(self.host[1:-1]) + r"\]?"
        else:
            rx = re.escape(self.host) + r"\.?"
        port = str(self.port) if self.port is not None else "(?:443|80)"
        return rf"^{rx}:{port}$"


def canonical_uri(url: str) -> str:
    """The canonical URI of a server (RFC 8707 section 2; RFC 3986 section 6.2.2): scheme
    and host lower-cased, no fragment, no trailing slash on an empty path."""
    parts = urlsplit(url)
    path = "" if parts.path == "/" else parts.path
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


_UNSAFE_SEGMENT = re.compile(r"%(?:2e|2f|5c)|\\", re.IGNORECASE)


def path_within(resource: str, target: str) -> bool:
    """Whether the request-target ``target`` (path and query, origin-form) is the endpoint of
    ``resource`` (a canonical URI, :func:`canonical_uri`) or below it: its path segments
    start with the resource's, compared exactly. A path with a dot segment, an encoded dot,
    slash or backslash, or a backslash is never within: a next hop may normalise it to
    another path (RFC 3986 section 5.2.4) than the one compared here."""
    path = target.split("?", 1)[0].split("#", 1)[0] or "/"
    if not path.startswith("/") or _UNSAFE_SEGMENT.search(path):
        return False
    segments = path.split("/")[1:]
    if any(seg in (".", "..") for seg in segments):
        return False
    base = [seg for seg in urlsplit(resource).path.split("/")[1:] if seg]
    given = segments[:len(base)]
    return given == base
