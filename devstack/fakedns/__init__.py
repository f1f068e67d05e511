"""Fake DNS for the stack's processes (:mod:`devstack.fakedns.sitecustomize` has the rule
format) and the same routing for the test process's own HTTP client.

A process started with :func:`environ` merged into its environment resolves the rules'
names to their fake server, port 443 included; :class:`RoutingTransport` does the same for
an httpx2 client of the test process itself (which cannot re-run ``sitecustomize``),
keeping the URL's host in the Host header and in SNI.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx2

from devstack.fakedns.sitecustomize import ENV, FAKED_PORT, Rule, lookup, parse_rules

DIRECTORY = str(Path(__file__).resolve().parent)

__all__ = ["DIRECTORY", "ENV", "RoutingTransport", "environ", "parse_rules", "spec"]


def spec(rules: Mapping[str, Sequence[str]]) -> str:
    """``{"127.0.0.1:PORT": [names...]}`` as a ``DEVSTACK_FAKE_DNS`` value."""
    return ";".join(f"{','.join(names)}={target}" for target, names in rules.items())


def environ(fake_dns: str, *, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables that turn fake DNS on in a child process: ``DEVSTACK_FAKE_DNS`` and a
    ``PYTHONPATH`` with this directory first (then ``base``'s PYTHONPATH). Raises
    ValueError for a malformed ``fake_dns``."""
    parse_rules(fake_dns)  # fail here, not in a child's start-up
    path = [DIRECTORY, *(p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p)]
    return {ENV: fake_dns, "PYTHONPATH": os.pathsep.join(path)}


class RoutingTransport(httpx2.BaseTransport):
    """An httpx2 transport that sends ``https://<faked name>[:443]/...`` to the rule's
    target, with the name in the Host header and in SNI (certificate checked against it);
    everything else goes out unchanged. Connections are not kept alive (one SNI each)."""

    def __init__(self, fake_dns: str, *, verify: ssl.SSLContext | bool = True) -> None:
        self._rules: list[Rule] = parse_rules(fake_dns)
        self._inner = httpx2.HTTPTransport(
            verify=verify, retries=0, limits=httpx2.Limits(max_keepalive_connections=0))

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        rule = lookup(self._rules, url.host) if url.scheme == "https" else None
        if rule is not None and (url.port or FAKED_PORT) == FAKED_PORT:
            request.url = url.copy_with(host=rule.host, port=rule.port)
            request.extensions = {**request.extensions, "sni_hostname": url.host}
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()
