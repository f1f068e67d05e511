"""Microsoft Entra ID tokens for Redis (Azure Managed Redis, Azure Cache for Redis).

Two identity providers for redis-entraid's credential provider
(:func:`proxy.coordination.redis.entra_credentials`):

- :func:`default_identity_provider`: azure-identity's ``DefaultAzureCredential`` (workload
  identity on Kubernetes, a managed identity, environment variables), the token for
  ``https://redis.azure.com/.default``
  (https://learn.microsoft.com/azure/redis/entra-for-authentication);
- :class:`TokenFileIdentityProvider`: a file holding the token, re-read at each renewal
  (a token provisioned by something else; tests).

A token is a JWT whose ``oid`` claim is the Redis user (redis-entraid reads it without
verifying it: Redis verifies the token).
"""

from __future__ import annotations

from pathlib import Path

from redis.auth.idp import IdentityProviderInterface
from redis.auth.token import JWToken, TokenInterface


class TokenFileIdentityProvider(IdentityProviderInterface):
    """The JWT in ``path`` (surrounding white space ignored), read on every request."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def request_token(self, force_refresh: bool = False) -> TokenInterface:
        """Raises ``OSError`` when the file cannot be read, ``ValueError`` when it holds
        no JWT (redis-entraid retries, then reports the failure)."""
        text = self._path.read_text(encoding="ascii").strip()
        if text.count(".") != 2:
            raise ValueError(f"{self._path} does not hold a JWT")
        try:
            return JWToken(text)
        except Exception as exc:  # PyJWT's decode errors: not a JWT after all
            raise ValueError(f"{self._path} does not hold a JWT") from exc


def default_identity_provider(scope: str) -> IdentityProviderInterface:
    """redis-entraid's identity provider on azure-identity's DefaultAzureCredential."""
    from azure.identity import DefaultAzureCredential
    from redis_entraid.identity_provider import DefaultAzureCredentialProvider

    provider: IdentityProviderInterface = DefaultAzureCredentialProvider(
        DefaultAzureCredential(), (scope,))
    return provider
