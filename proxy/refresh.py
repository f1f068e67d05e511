"""Refreshing access tokens (RFC 6749 section 6): the names the rest of credproxy (and
its tests) import. The client is :class:`proxy.provider_client.ProviderClient`, the one
client for refresh, code exchange and revocation."""

from __future__ import annotations

from proxy.provider_client import InvalidGrant, ProviderClient

Refresher = ProviderClient

__all__ = ["InvalidGrant", "ProviderClient", "Refresher"]
