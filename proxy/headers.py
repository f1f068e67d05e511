"""The request header policy: what every request must look like before any decision, and
which fields a client can never send past the proxy under any spelling.

The proxy must read a request the way every later hop will, or a later hop may see what the
proxy never decided on. Three readings differ in practice:

* **Spelling.** WSGI and CGI servers turn a field name into ``HTTP_`` + upper case with ``-``
  mapped to ``_`` (PEP 3333, RFC 3875 section 4.1.18), so ``X_User_Context`` and
  ``X-User-Context`` arrive as one variable, and duplicates are joined with a comma
  (``HTTP_X_API_KEY = "attacker-key,<token>"``). A protected name is therefore compared by
  its *key*, :func:`field_key`: case-folded, every run of ``-``, ``_`` and ``.`` read as one
  ``-``. (The oauth2-proxy
  underscore-header advisory of 2025, GHSA-vjrc-mh2v-45x6 / CVE-2025-64484, is this
  fault.)
* **Connection options.** RFC 9110 section 7.6.1: a proxy removes every field its
  ``Connection`` header nominates and must not forward the nomination; a next hop that
  honours ``Connection: Authorization`` would drop the injected credential.
* **Upgrades.** Only an upgrade to WebSocket is forwarded (mitmproxy reads WebSocket frames
  after the 101; any other protocol would be relayed as raw bytes no decision covers): the
  ``Upgrade`` field and option go from every other request.
* **Field syntax.** RFC 9112 section 5.2 obsoletes line folding; RFC 9110 section 5.5 allows
  no CR, LF or NUL in a value, and section 5.1 makes a name a token. mitmproxy joins a folded
  line into the previous value as ``"\\r\\n "``; a next hop may read that continuation as a
  header line of its own. Such requests are refused (400) before anything else.

:class:`HeaderPolicy` applies all three in one pass (:meth:`HeaderPolicy.read`); the addon
only reads the fields and writes back what the policy returns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxy.errors import ExpectationFailed, MalformedRequest

Fields = tuple[tuple[bytes, bytes], ...]
"""Header fields as mitmproxy keeps them: (name, value) byte pairs, in order."""

PROXY_AUTHORIZATION = "Proxy-Authorization"
AUTHORIZATION = "Authorization"
_PROXY_AUTHORIZATION_LOWER = PROXY_AUTHORIZATION.lower()

_SEPARATORS = re.compile(r"[-_.]+")
# RFC 9110 section 5.6.2 token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 section 5.5: a value is VCHAR, obs-text, SP and HTAB; every other control byte
# (CR and LF of a folded line, NUL, DEL) is refused.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# What a request-target can never hold (RFC 9112 section 3.2, RFC 3986 section 3.3): an
# HTTP/2 :path is not parsed the way an HTTP/1 request line is, so it is checked here.
_TARGET_BAD = re.compile(r"[\x00-\x20\x7f#]")
# Connection options that are not a request's own fields to strip: mitmproxy handles them
# itself (keep-alive and close towards the client, Upgrade for WebSocket).
_CONNECTION_OPTIONS = frozenset({"close", "keep-alive", "upgrade"})
# Fields that frame or route the message: mitmproxy has already read them, so removing one
# because Connection nominated it would forward a body with no framing (the next hop then
# parses it as further requests) or a request with no Host. Such a nomination is refused.
_NEVER_NOMINATED = frozenset({"content-length", "transfer-encoding", "host"})


def field_key(name: str | bytes) -> str:
    """The name as any hop may read it: case-folded, and every run of the separators a next
    hop may normalise (``-``, ``_``, ``.``) read as one ``-``: ``X_User_Context``,
    ``x.user.context`` and ``X--User-Context`` are all ``x-user-context``."""
    text = name.decode("latin-1") if isinstance(name, bytes) else name
    return _SEPARATORS.sub("-", text.casefold())


@dataclass(frozen=True, slots=True)
class ReadHeaders:
    """One request's header section, read once.

    ``context`` and ``proxy_authorization`` hold the values sent under the exact names (any
    case); ``lookalikes`` the other spellings of those names that were sent (e.g.
    ``X_User_Context``), which count as one more copy; ``fields`` is what may be forwarded:
    neither identity header in any spelling, no field the ``Connection`` header nominated,
    and ``Connection`` itself reduced to close / keep-alive / upgrade."""

    context: tuple[str, ...]
    proxy_authorization: tuple[str, ...]
    lookalikes: tuple[str, ...]
    fields: Fields


class HeaderPolicy:
    """The protected names of one configuration: the user-context header and
    ``Proxy-Authorization`` (identity: stripped from every request), ``Authorization`` and
    each provider's inject header (credentials: stripped from every credentialed request,
    see :meth:`without`)."""

    def __init__(self, context_header: str) -> None:
        self.context_header = context_header
        self._context_key = field_key(context_header)
        self._context_lower = context_header.lower()
        self._proxy_key = field_key(PROXY_AUTHORIZATION)

    def read(self, fields: Sequence[tuple[bytes, bytes]]) -> ReadHeaders:
        """Check and split a request's fields. Raises :class:`MalformedRequest` (400) for a
        name that is not a token, a value with a control byte (a folded line included), or a
        ``Connection`` header nominating something that is not a token or that frames or
        routes the message (Content-Length, Transfer-Encoding, Host)."""
        check_fields(fields)
        keyed = [(field_key(name), name, value) for name, value in fields]
        nominated: set[str] = set()
        options: list[str] = []
        for key, _, value in keyed:
            if key == "connection":
                for option in value.decode("latin-1").split(","):
                    option = option.strip()
                    if not option:
                        continue
                    if not _TOKEN.fullmatch(option.encode("latin-1")):
                        raise MalformedRequest("the Connection header names something that is "
                                               "not a field name", reason="bad_connection")
                    option_key = field_key(option)
                    if option_key in _NEVER_NOMINATED:
                        raise MalformedRequest(f"the Connection header nominates {option}, "
                                               "which frames or routes the request; remove "
                                               "it from Connection", reason="bad_connection")
                    if option_key in _CONNECTION_OPTIONS:
                        if option_key not in options:
                            options.append(option_key)
                    else:
                        nominated.add(option_key)
        context: list[str] = []
        proxy_auth: list[str] = []
        lookalikes: list[str] = []
        kept: list[tuple[str, bytes, bytes]] = []
        for key, name, value in keyed:
            if key in (self._context_key, self._proxy_key):
                text = name.decode("latin-1")
                exact = text.lower() == (self._context_lower if key == self._context_key
                                         else _PROXY_AUTHORIZATION_LOWER)
                if not exact:
                    lookalikes.append(text)
                elif key == self._context_key:
                    context.append(value.decode("latin-1"))
                else:
                    proxy_auth.append(value.decode("latin-1"))
            elif key == "connection":
                continue
            elif key == "expect" and value.decode("latin-1").strip().lower() != "100-continue":
                raise ExpectationFailed("Expect may only be 100-continue (RFC 9110 section "
                                        "10.1.1); send the request without it",
                                        reason="bad_expect")
            elif key in nominated or (key == "keep-alive" and "keep-alive" in options):
                continue  # hop-by-hop: addressed to the proxy, never forwarded
            else:
                kept.append((key, name, value))
        if not _websocket_only((key, value) for key, _, value in kept):
            # An upgrade to anything but WebSocket would turn the connection into a raw relay
            # after the 101 (mitmproxy decodes only WebSocket): no later byte decided on.
            kept = [field for field in kept if field[0] != "upgrade"]
            if "upgrade" in options:
                options.remove("upgrade")
        forwarded = [(name, value) for _, name, value in kept]
        if options:
            forwarded.append((b"Connection", ", ".join(options).encode("ascii")))
        return ReadHeaders(tuple(context), tuple(proxy_auth), tuple(lookalikes),
                           tuple(forwarded))

    @staticmethod
    def without(fields: Iterable[tuple[bytes, bytes]], names: Iterable[str]) -> Fields:
        """``fields`` minus every field whose key (:func:`field_key`) is one of ``names``':
        ``X_Api_Key`` goes with ``X-Api-Key``."""
        keys = {field_key(n) for n in names}
        return tuple((n, v) for n, v in fields if field_key(n) not in keys)


def _websocket_only(keyed: Iterable[tuple[str, bytes]]) -> bool:
    """Whether every ``Upgrade`` value names only WebSocket (RFC 6455 section 4.1), or
    there is none. ``keyed``: (:func:`field_key` of the name, value) pairs."""
    for key, value in keyed:
        if key == "upgrade":
            tokens = {t.strip().lower() for t in value.decode("latin-1").split(",")}
            if tokens != {"websocket"}:
                return False
    return True


def is_websocket_upgrade(status: int, fields: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a ``101 Switching Protocols`` response switches to WebSocket (the only
    protocol whose bytes mitmproxy still reads after a 101)."""
    keyed = [(field_key(n), v) for n, v in fields]
    return status == 101 and any(key == "upgrade" for key, _ in keyed) and \
        _websocket_only(keyed)


def check_target(path: str, method: str, *, credentialed: bool) -> None:
    """Raise :class:`MalformedRequest` unless ``method`` is a token (``bad_method``) and
    ``path`` (the request-target as forwarded: path and query), free of spaces, control
    characters and ``#``, is origin-form, which every later hop reads the same way: it starts with
    ``/`` (RFC 9112 section 3.2.1), or is ``*`` for OPTIONS (section 3.2.4). An HTTP/2
    ``:path`` holding a whole URL (RFC 9113 section 8.3.1 forbids it) would reach an HTTP/1
    provider as an absolute-form target that servers route by (``bad_target``). On a
    credentialed request a target starting with ``//`` is refused too
    (``ambiguous_target``): URL libraries read it as a network-path reference to another host
    (``new URL("//other.example/x", base)``)."""
    if not _TOKEN.fullmatch(method.encode("latin-1", "replace")):
        raise MalformedRequest("the method is not a token (RFC 9110 section 9.1)",
                               reason="bad_method")
    if _TARGET_BAD.search(path):
        raise MalformedRequest("the request-target holds a space, a control character or a "
                               "'#' (RFC 9112 section 3.2); percent-encode it",
                               reason="bad_target")
    if path == "*" and method.upper() == "OPTIONS":
        return
    if not path.startswith("/"):
        raise MalformedRequest("the request-target must be a path starting with '/' (origin-"
                               "form); send the authority in Host or :authority",
                               reason="bad_target")
    if credentialed and path.startswith("//"):
        raise MalformedRequest("a request-target starting with '//' can be read as another "
                               "host; remove the extra slash", reason="ambiguous_target")


def check_fields(fields: Iterable[tuple[bytes, bytes]]) -> None:
    """Raise :class:`MalformedRequest` unless every name is a token (RFC 9110 section 5.1)
    and no value holds a control byte other than HTAB (section 5.5; RFC 9112 section 5.2
    obsoletes line folding). The message names the field, never its value."""
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            raise MalformedRequest("a header field name is not a token (RFC 9110 section 5.1)",
                                   reason="bad_field_name")
        if _BAD_VALUE.search(value):
            shown = name.decode("latin-1")
            if b"\r" in value or b"\n" in value:
                raise MalformedRequest(f"header field {shown} is folded over several lines "
                                       "(obsolete line folding, RFC 9112 section 5.2)",
                                       reason="obs_fold")
            raise MalformedRequest(f"header field {shown} holds a control character "
                                   "(RFC 9110 section 5.5)", reason="control_character")
