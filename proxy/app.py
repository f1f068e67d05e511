"""Wiring: build a :class:`proxy.sidecar.Sidecar` and its parts from :class:`Settings`."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx2

from proxy.admin import AdminServer
from proxy.audit import AuditLog, new_instance_id, open_sink
from proxy.connect import Connector
from proxy.coordination import Coordinator, MemoryCoordinator
from proxy.errors import ConfigError
from proxy.identity import IdentityVerifier, KeySource
from proxy.offboard import Offboarder
from proxy.refresh import Refresher
from proxy.routes import Router
from proxy.secret import Secret
from proxy.settings import ProviderSettings, Settings, resolve_secret
from proxy.sidecar import Sidecar
from proxy.tokens import TokenBroker
from proxy.vault.base import Vault
from proxy.vault.keys import derive_subkey, load_key
from proxy.vault.local import LocalVault


@dataclass
class App:
    """Everything a running proxy holds; :meth:`aclose` releases it."""

    settings: Settings
    sidecar: Sidecar
    vault: Vault
    coordinator: Coordinator
    refresher: Refresher
    http: httpx2.AsyncClient
    connector: Connector
    offboarder: Offboarder
    admin: AdminServer | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self, *, serve_admin: bool = True) -> None:
        """Start background work; call once inside the running event loop."""
        await self.coordinator.start()
        self._tasks.append(asyncio.create_task(self.sidecar.broker.watch_vault()))
        if serve_admin and self.settings.admin:
            self.admin = AdminServer(
                self.settings, self.sidecar.verifier, self.connector, self.vault,
                [("vault", self.vault.epoch), ("coordination", self.coordinator.check)],
                self.sidecar.metrics)
            await self.admin.start()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.admin is not None:
            await self.admin.stop()
        await self.connector.aclose()
        await self.offboarder.aclose()
        await self.refresher.aclose()
        await self.http.aclose()
        await self.coordinator.close()
        await self.vault.close()
        self.sidecar.audit.close()


def upstream_ssl_context(settings: Settings) -> ssl.SSLContext:
    """System trust plus ``upstream_ca_file`` (private CAs, tests)."""
    ctx = ssl.create_default_context()
    if settings.upstream_ca_file:
        try:
            ctx.load_verify_locations(os.path.expanduser(settings.upstream_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"upstream_ca_file: cannot load {settings.upstream_ca_file}: "
                              f"{exc}") from exc
    return ctx


def open_vault(settings: Settings, environ: Mapping[str, str] = os.environ,
               clock: Callable[[], float] = time.time) -> tuple[Vault, bytes]:
    """The vault and its key (other components derive their keys from it)."""
    v = settings.vault
    key = load_key(key_env=v.key_env if not v.key_file else None, key_file=v.key_file,
                   environ=environ)
    return LocalVault.open(os.path.expanduser(v.path), key, clock=clock), key


def client_secrets(settings: Settings,
                   environ: Mapping[str, str] = os.environ) -> dict[str, Secret | None]:
    """Resolve every provider's client secret once, so a missing one fails at start."""
    out: dict[str, Secret | None] = {}
    for p in settings.providers:
        if p.token_endpoint_auth_method == "none":
            out[p.id] = None
        else:
            out[p.id] = resolve_secret(env=p.client_secret_env, file=p.client_secret_file,
                                       what=f"providers[{p.id}].client_secret", environ=environ)
    return out


def make_coordinator(settings: Settings, vault_key: bytes,
                     environ: Mapping[str, str] = os.environ,
                     clock: Callable[[], float] = time.time) -> Coordinator:
    if settings.coordination.backend == "redis":
        from proxy.coordination.redis import RedisCoordinator

        return RedisCoordinator(settings.coordination,
                                cache_key=derive_subkey(vault_key, "credproxy shared cache"),
                                environ=environ, clock=clock)
    return MemoryCoordinator(clock)


def build(settings: Settings, *, environ: Mapping[str, str] = os.environ,
          clock: Callable[[], float] = time.time) -> App:
    tls = upstream_ssl_context(settings)
    secrets = client_secrets(settings, environ)
    vault, key = open_vault(settings, environ, clock)
    http = httpx2.AsyncClient(verify=tls, timeout=10.0, trust_env=False)
    coordinator = make_coordinator(settings, key, environ, clock)
    refresher = Refresher(settings.refresh, verify=tls, clock=clock)
    verifier = IdentityVerifier(settings.identity,
                                KeySource.from_settings(settings.identity, http, environ),
                                replay=coordinator, clock=clock)

    def secret_for(p: ProviderSettings) -> Secret | None:
        return secrets[p.id]

    broker = TokenBroker(vault, coordinator, refresher, client_secret=secret_for,
                         connect_url=settings.connect_url, clock=clock)
    audit = AuditLog(open_sink(os.path.expanduser(settings.audit.sink)
                               if settings.audit.sink != "stdout" else "stdout"),
                     instance=settings.audit.instance or new_instance_id(),
                     fingerprint_key=derive_subkey(key, "credproxy audit fingerprint"),
                     clock=clock)
    sidecar = Sidecar(settings, verifier, Router(settings.providers), broker, audit)
    connector = Connector(settings, vault, coordinator, audit, client_secret=secret_for,
                          state_key=derive_subkey(key, "credproxy connect state"), verify=tls,
                          clock=clock)
    offboarder = Offboarder(settings, vault, coordinator, audit, client_secret=secret_for,
                            verify=tls)
    return App(settings, sidecar, vault, coordinator, refresher, http, connector, offboarder)
