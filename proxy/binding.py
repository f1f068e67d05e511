"""Grants bound to their tenant: grant values and the grant's own hosts (docs/tenants.md).

A provider entry may name non-secret **grant values** (``grant_values``): an org's
instance URL from the token response (Salesforce ``instance_url``), a company id from the
authorization callback (Intuit ``realmId``), a shop or region the user chooses when
connecting, a site found by a discovery call after connecting (Atlassian's
``accessible-resources``, Graph's ``sites/root``). Each grant stores its values; the
provider's ``grant_hosts`` templates over them are the grant's own hosts, the only ones
its credential goes to, and its endpoint URLs may use them (Shopify's token URL is per
shop).

This module holds the model of a value's configuration, and the pure functions that read
a value from where it comes from, check it (:class:`BindingError` otherwise) and render
templates with the values. Hosts are parsed with the one host grammar
(:mod:`proxy.hosts`). The HTTP of discovery is :mod:`proxy.provider_client`'s; the flow
that collects values is :mod:`proxy.connect`'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Annotated, Any, Final, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.hosts import HostPattern

ValueSource = Literal["token_response", "callback", "choice", "discovery"]
ValueKind = Literal["id", "host", "url"]
# A stored value: one string, or several (a "*" in the field path) kept as metadata only.
GrantValue = str | tuple[str, ...]
GrantValues = Mapping[str, GrantValue]

PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# An id ends up inside URLs and host names: a DNS-ish token, never '/', '@', ':' or '%'.
_ID: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?")
_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,62}")
_FIELD: Final = re.compile(r"(?:[A-Za-z0-9_$-]{1,64}|\*)(?:\.(?:[A-Za-z0-9_$-]{1,64}|\*)){0,7}")
_PARAM: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Members that hold tokens: grant values are shown to agents and operators. Compared
# without case, '_' and '-' (providers also say accessToken, refresh-token).
_TOKEN_FIELDS: Final = frozenset({"accesstoken", "refreshtoken", "idtoken"})
# Query parameters the connect flow and the OAuth callback use themselves.
RESERVED_PARAMS: Final = frozenset({
    "state", "code", "error", "error_description", "error_uri", "iss", "session_state",
    "scope", "return_to", "context"})
_URL_MAX: Final = 2048
# A host name's longest text form (RFC 1035 section 2.3.4: 255 octets on the wire).
_HOST_MAX: Final = 253
# How much of a refused value a message repeats (it may be a token).
_SHOWN_MAX: Final = 80


class BindingError(ValueError):
    """A grant value that cannot be had or is not acceptable; ``reason`` is a registered
    reason code (``grant_value_missing``, ``grant_value_invalid``, ``grant_value_mismatch``,
    ``grant_host_not_allowed``, ``discovery_failed``); the message names the value, never
    a token."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True,
                              populate_by_name=True)


class GrantValueSettings(_Model):
    """One ``grant_values`` entry: where the value comes from and how it is checked."""

    source: ValueSource = Field(alias="from")
    # Anchored: a Field pattern matches anywhere in the value (re.search semantics).
    field: Annotated[str, Field(pattern=f"^(?:{_FIELD.pattern})$")] | None = None
    param: Annotated[str, Field(pattern=f"^(?:{_PARAM.pattern})$")] | None = None
    url: str | None = None
    kind: ValueKind = "id"
    pattern: str | None = None  # id: a regex the whole value must match
    # host: the host patterns the value must match (None: the provider's ceiling).
    allowed: list[str] | None = None
    required: bool = True

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return v

    @field_validator("allowed")
    @classmethod
    def _allowed(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("list at least one host pattern (or leave it out)")
        return [str(HostPattern.parse(h)) for h in v]

    @model_validator(mode="after")
    def _shape(self) -> Self:
        needs_field = self.source in ("token_response", "discovery")
        if needs_field and self.field is None:
            raise ValueError(f"from {self.source} needs field (a path into the JSON answer)")
        if not needs_field and self.field is not None:
            raise ValueError(f"from {self.source} takes param, not field")
        if self.field is not None and any(
                re.sub(r"[_-]", "", part.lower()) in _TOKEN_FIELDS
                for part in self.field.split(".")):
            raise ValueError(f"field {self.field!r} names a token: grant values are shown "
                             "to agents and operators, tokens never")
        if self.param is not None and needs_field:
            raise ValueError(f"from {self.source} takes field, not param")
        if self.source == "discovery":
            if not self.url or not self.url.startswith(("https://", "http://")):
                raise ValueError("from discovery needs url: the https URL to GET")
        elif self.url is not None:
            raise ValueError("url is only for from: discovery")
        if self.pattern is not None and self.kind != "id":
            raise ValueError("pattern is for kind id; a host is checked against allowed")
        if self.allowed is not None and self.kind != "host":
            raise ValueError("allowed is for kind host")
        return self

    @property
    def many(self) -> bool:
        """Whether the value is a list (a ``*`` in its field path): metadata only."""
        return self.field is not None and "*" in self.field.split(".")

    @property
    def user_input(self) -> bool:
        """Whether the value comes from the browser (a choice or a callback parameter)."""
        return self.source in ("choice", "callback")


def placeholders(text: str) -> list[str]:
    """The ``{name}`` placeholders of ``text``, in order."""
    return PLACEHOLDER.findall(text)


def check_names(values: Mapping[str, GrantValueSettings]) -> None:
    """Raise ValueError when a value's name or parameter is unusable."""
    for name, spec in values.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"grant_values.{name}: a grant value's name is lower case "
                             "letters, digits and _, starting with a letter")
        param = spec.param or name
        if spec.user_input and param in RESERVED_PARAMS:
            raise ValueError(f"grant_values.{name}: parameter {param!r} is used by the "
                             "connect flow itself; set param to another name")


def check_template(text: str, *, where: str, values: Mapping[str, GrantValueSettings],
                   sources: Sequence[ValueSource] | None) -> None:
    """Raise ValueError when ``text`` names a placeholder that is not a grant value, a list
    value, or a value whose source is not in ``sources`` (None: any source)."""
    for name in placeholders(text):
        spec = values.get(name)
        if spec is None:
            raise ValueError(f"{where}: {{{name}}} is not one of grant_values "
                             f"({sorted(values) or 'none'})")
        if spec.many:
            raise ValueError(f"{where}: {{{name}}} is a list (its field has '*'): metadata "
                             "only, never part of a URL or host")
        if spec.kind == "url":
            raise ValueError(f"{where}: {{{name}}} is a URL value; use kind host or id")
        if sources is not None and spec.source not in sources:
            raise ValueError(f"{where}: {{{name}}} comes from {spec.source}, which is not "
                             f"known yet there (only {', '.join(sources)} values are)")


def check_host_template(text: str, *, where: str) -> None:
    """Raise ValueError when ``text``, with its placeholders filled, could not be one host
    (a wildcard, a path, user info)."""
    sample = PLACEHOLDER.sub("x0", text)
    try:
        pattern = HostPattern.parse(sample)
    except ValueError as exc:
        raise ValueError(f"{where}: {text!r} is not a host template ({exc})") from None
    if pattern.wildcard:
        raise ValueError(f"{where}: {text!r}: a grant's own host is never a wildcard")


def render(text: str, values: GrantValues) -> str:
    """``text`` with its ``{name}`` placeholders replaced by ``values``. Raises
    :class:`BindingError` (``grant_value_missing``) when one has no (single) value."""

    def fill(match: re.Match[str]) -> str:
        value = values.get(match.group(1))
        if not isinstance(value, str):
            raise BindingError("grant_value_missing",
                               f"the grant has no value {match.group(1)!r}: reconnect")
        return value

    return PLACEHOLDER.sub(fill, text)


def own_hosts(templates: Sequence[str], values: GrantValues) -> list[HostPattern]:
    """The grant's own hosts: ``templates`` rendered with ``values``, each one exact host
    (a :class:`HostPattern` that is no wildcard). Raises :class:`BindingError`."""
    hosts: list[HostPattern] = []
    for template in templates:
        text = render(template, values)
        try:
            host = _parsed(text)
        except ValueError:
            host = None
        if host is None or host.wildcard:
            raise BindingError("grant_value_invalid",
                               f"the grant's host {text!r} is not one host name")
        hosts.append(host)
    return hosts


@lru_cache(maxsize=4096)
def _parsed(text: str) -> HostPattern:
    """:meth:`HostPattern.parse`, remembered: a bound provider's ceiling patterns and a
    grant's rendered hosts are read on every request to it. Raises ValueError."""
    return HostPattern.parse(text)


def within(host: HostPattern, ceiling: Sequence[str]) -> bool:
    """Whether the exact ``host`` is one the ceiling's patterns (``hosts``) match."""
    port = host.port if host.port is not None else 443
    return any(_parsed(p).matches(host.host, port, tls=True) for p in ceiling)


def covers(ceiling: Sequence[str], pattern: str) -> bool:
    """Whether every host ``pattern`` matches is one the ``ceiling`` patterns match too
    (``*.b.c`` covers ``a.b.c``, ``*.a.b.c`` and ``*.b.c``; nothing but itself covers a
    wildcard's own suffix)."""
    p = HostPattern.parse(pattern)
    for text in ceiling:
        c = HostPattern.parse(text)
        if (c.port or 443) != (p.port or 443):
            continue
        if not p.wildcard:
            if c.matches(p.host, p.port or 443, tls=True):
                return True
        elif c.wildcard and (p.host == c.host or p.host.endswith(c.host[1:])):
            return True
    return False


def read_field(data: Any, path: str) -> str | list[str] | None:
    """The value at a dotted ``path`` of a JSON document: a member name, a list index
    (digits), or ``*`` (every item of a list, giving a list). None when absent or not a
    string (numbers are read as their decimal text: ids such as Intuit's realm are
    numbers in some answers)."""
    parts = path.split(".")

    def walk(node: Any, i: int) -> list[Any]:
        if i == len(parts):
            return [node]
        part = parts[i]
        if part == "*":
            if not isinstance(node, list):
                return []
            return [found for item in node for found in walk(item, i + 1)]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return []
            return walk(node[int(part)], i + 1)
        if isinstance(node, Mapping) and part in node:
            return walk(node[part], i + 1)
        return []

    found = [_text(v) for v in walk(data, 0)]
    texts = [v for v in found if v is not None]
    if "*" in parts:
        return texts
    return texts[0] if texts else None


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    return value if isinstance(value, str) else None


def check_value(name: str, spec: GrantValueSettings, raw: str | list[str] | None, *,
                ceiling: Sequence[str]) -> GrantValue | None:
    """The value ``raw`` read for ``name``, checked and normalised: an id matching the
    id grammar and ``pattern``; a host (a host name or an absolute URL, whose host[:port]
    is taken) in the one host grammar, no wildcard, matching ``allowed`` (default:
    ``ceiling``), rendered as ``host`` or ``host:port``; a URL (https, no user info).
    None when absent and not required. Raises :class:`BindingError`."""
    if raw is None or raw == "" or raw == []:
        if spec.required:
            where = {"choice": f"the connect link's {spec.param or name!r} parameter",
                     "callback": f"the callback's {spec.param or name!r} parameter",
                     "token_response": f"the token response's {spec.field!r}",
                     "discovery": f"the discovery answer's {spec.field!r}"}[spec.source]
            raise BindingError("grant_value_missing",
                               f"grant value {name!r} is missing: {where} is absent")
        return None
    if isinstance(raw, list):
        return tuple(_one(name, spec, item, ceiling) for item in raw)
    return _one(name, spec, raw, ceiling)


def _one(name: str, spec: GrantValueSettings, raw: str, ceiling: Sequence[str]) -> str:
    shown = _shown(raw)
    if spec.kind == "id":
        if not _ID.fullmatch(raw) or (spec.pattern is not None
                                      and not re.fullmatch(spec.pattern, raw)):
            raise BindingError("grant_value_invalid",
                               f"grant value {name!r} = {shown!r} is not an accepted value"
                               + (f" (it must match {spec.pattern!r})" if spec.pattern
                                  else ""))
        return raw
    if spec.kind == "url":
        parts = _url(raw)
        if parts is None:
            raise BindingError("grant_value_invalid",
                               f"grant value {name!r} = {shown!r} is not an https URL")
        return raw
    host = host_value(raw)
    allowed = spec.allowed if spec.allowed is not None else list(ceiling)
    if host is None:
        raise BindingError("grant_value_invalid",
                           f"grant value {name!r} = {shown!r} is not a host name")
    # Within the ceiling always: a value may end up in a token or authorize URL.
    if not within(host, allowed) or not within(host, ceiling):
        raise BindingError("grant_host_not_allowed",
                           f"grant value {name!r} = {_shown(str(host))!r} is not one of the "
                           f"hosts this provider may be bound to ({', '.join(allowed)})")
    return str(host)


def host_value(raw: str) -> HostPattern | None:
    """A host given as ``host[:port]`` or as an absolute https URL, parsed with the one
    host grammar; port 443 is dropped. None when it is not exactly one host (or a name
    longer than DNS allows, 253 characters)."""
    text = raw
    if "://" in raw:
        parts = _url(raw)
        if parts is None:
            return None
        text = parts.netloc
    if any(c in text for c in "/?#@\\*") or not text.isprintable() or not text:
        return None
    try:
        host = HostPattern.parse(text)
    except ValueError:
        return None
    if host.wildcard or len(host.host) > _HOST_MAX:
        return None
    return HostPattern(host.host, None if host.port in (None, 443) else host.port)


def _shown(raw: str) -> str:
    """At most the first 80 characters of a value, for a message (ASCII, escaped)."""
    return raw[:_SHOWN_MAX].encode("ascii", "backslashreplace").decode()


def _url(raw: str) -> Any:
    if len(raw) > _URL_MAX or not raw.isprintable() or any(c.isspace() for c in raw):
        return None
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    if parts.scheme.lower() != "https" or not parts.hostname or "@" in parts.netloc:
        return None
    return parts
