"""The running configuration as one immutable snapshot, swapped whole on a reload.

Everything a request, a connect flow or an offboarding reads from the configuration is in
one :class:`Snapshot`: the :class:`~proxy.settings.Settings`, the
:class:`~proxy.routes.Router` built from its providers (with the hosts of providers a
reload removed), the :class:`~proxy.identity.IdentityVerifier` and the header policy
derived from its header, and the providers' client secrets. A :class:`LiveConfig` holds
the current one; :meth:`LiveConfig.swap` replaces it with a single assignment, so there is
no moment at which a reader can see part of the old configuration and part of the new.

Components take the :class:`LiveConfig`, never settings, and read
:attr:`LiveConfig.current` once per operation (one request, one connect step, one
offboarding) and use that snapshot throughout. Code an operation reaches further down
(the token broker, the provider client) reads ``current`` too and gets the same snapshot:
an operation pins it (:meth:`LiveConfig.pinned`) for the asyncio task it runs in, so a
reload that lands while a request waits on a refresh lock does not give that request the
new client secret with the old provider entry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.headers import HeaderPolicy
from proxy.identity import IdentityVerifier
from proxy.routes import Router
from proxy.secret import Secret
from proxy.settings import ProviderSettings, Settings, resolve_secret

__all__ = ["LiveConfig", "Snapshot", "SwapListener", "client_secrets"]

log = logging.getLogger("credproxy.config")


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """One complete configuration of the running proxy. Immutable; compared by identity.

    ``secrets``: each provider's client secret by provider id (None for a public client,
    ``token_endpoint_auth_method: none``). ``headers`` is derived from the verifier's
    header (the protected user-context header), so the two never disagree."""

    settings: Settings
    router: Router
    verifier: IdentityVerifier
    secrets: Mapping[str, Secret | None]
    headers: HeaderPolicy = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "secrets", MappingProxyType(dict(self.secrets)))
        object.__setattr__(self, "headers", HeaderPolicy(self.verifier.header))

    @classmethod
    def build(cls, settings: Settings, verifier: IdentityVerifier, *,
              router: Router | None = None,
              secrets: Mapping[str, Secret | None] | None = None,
              environ: Mapping[str, str] = os.environ) -> Snapshot:
        """A snapshot of ``settings``: ``router`` defaults to one over its providers,
        ``secrets`` to every provider's client secret resolved now (:func:`client_secrets`,
        which raises :class:`~proxy.errors.ConfigError` naming the one that is missing)."""
        return cls(settings, router if router is not None else Router(settings.providers),
                   verifier, secrets if secrets is not None
                   else client_secrets(settings, environ))

    def client_secret(self, provider: ProviderSettings) -> Secret | None:
        """``provider``'s client secret (None: a public client). Raises ``KeyError`` for a
        provider this configuration does not have."""
        return self.secrets[provider.id]

    def connect_url(self, provider: ProviderSettings) -> str:
        """Where a user (re)connects ``provider`` (:meth:`Settings.connect_url`)."""
        return self.settings.connect_url(provider)

    def provider(self, provider_id: str) -> ProviderSettings:
        """The provider with this id. Raises :class:`~proxy.errors.ConfigError`."""
        return self.settings.provider(provider_id)


SwapListener = Callable[[Snapshot], None]


class LiveConfig:
    """Holds the running :class:`Snapshot`. :meth:`swap` is the only way to change it."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._listeners: list[SwapListener] = []
        # Per asyncio task (contextvars): the snapshot of the operation running in it.
        self._pinned: ContextVar[Snapshot | None] = ContextVar(
            f"credproxy-live-{id(self):x}", default=None)

    @classmethod
    def of(cls, settings: Settings, verifier: IdentityVerifier, *,
           router: Router | None = None,
           secrets: Mapping[str, Secret | None] | None = None,
           environ: Mapping[str, str] = os.environ) -> LiveConfig:
        """A holder of :meth:`Snapshot.build` ``(settings, verifier, ...)``."""
        return cls(Snapshot.build(settings, verifier, router=router, secrets=secrets,
                                  environ=environ))

    @property
    def current(self) -> Snapshot:
        """The snapshot of the operation running in this task (:meth:`pinned`), else the
        latest one swapped in."""
        pinned = self._pinned.get()
        return pinned if pinned is not None else self._snapshot

    @property
    def latest(self) -> Snapshot:
        """The latest snapshot swapped in, whatever the operation in this task runs on:
        what a reload builds on."""
        return self._snapshot

    @contextmanager
    def pinned(self, snapshot: Snapshot | None = None) -> Iterator[Snapshot]:
        """Run an operation on one snapshot: inside the ``with`` block, in this asyncio
        task (and tasks it creates), :attr:`current` is ``snapshot`` (default: the current
        one) whatever is swapped in meanwhile. Yields it."""
        snap = snapshot if snapshot is not None else self.current
        token = self._pinned.set(snap)
        try:
            yield snap
        finally:
            try:
                self._pinned.reset(token)
            except ValueError:
                # Closed outside its task (a coroutine collected while suspended in the
                # block): that context never held the pin, so there is nothing to undo.
                pass

    def swap(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the running configuration (one assignment: every operation
        that starts afterwards sees all of it, one already running keeps its own), then
        call the listeners (:meth:`on_swap`). A listener that raises is logged; the swap
        stands."""
        self._snapshot = snapshot
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:  # the config is applied; a listener must not undo that
                log.exception("config reload listener %r failed", listener)

    def on_swap(self, listener: SwapListener) -> None:
        """Call ``listener(snapshot)`` after every :meth:`swap`."""
        self._listeners.append(listener)


def client_secrets(settings: Settings,
                   environ: Mapping[str, str] = os.environ) -> dict[str, Secret | None]:
    """Resolve every provider's client secret once, so a missing one fails at start (or
    fails the reload). Raises :class:`~proxy.errors.ConfigError` naming the provider."""
    out: dict[str, Secret | None] = {}
    for p in settings.providers:
        if p.token_endpoint_auth_method == "none":
            out[p.id] = None
        else:
            out[p.id] = resolve_secret(env=p.client_secret_env, file=p.client_secret_file,
                                       what=f"providers[{p.id}].client_secret", environ=environ)
    return out
