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
from proxy.errors import ConfigError, CredproxyError
from proxy.identity import IdentityVerifier, KeySource
from proxy.metrics import Metrics
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
    secrets: dict[str, Secret | None] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    admin: AdminServer | None = None
    draining: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # Keys that only take effect on restart (sockets, stores, the audit chain).
    RESTART_KEYS = ("listen", "admin", "public_url", "ca_dir", "upstream_ca_file", "vault",
                    "coordination", "audit", "stream_large_bodies")

    def reload(self, new: Settings) -> list[str]:
        """Apply a new configuration to the running proxy: providers, identity, refresh and
        connect settings change live. Everything is built first, so a bad config (say a
        provider whose client secret is missing) raises and leaves the old one serving.
        Returns the changed keys that need a restart."""
        old = self.settings
        restart = [k for k in self.RESTART_KEYS if getattr(new, k) != getattr(old, k)]
        if (new.unrouted == "tunnel") != (old.unrouted == "tunnel"):
            restart.append("unrouted")
        secrets = client_secrets(new, self.environ)
        router = Router(new.providers)
        verifier = self.sidecar.verifier
        if new.identity != old.identity:
            verifier = IdentityVerifier(new.identity,
                                        KeySource.from_settings(new.identity, self.http,
                                                                self.environ),
                                        replay=self.coordinator)
        # Swap: nothing below can fail.
        self.secrets.clear()
        self.secrets.update(secrets)
        sc = self.sidecar
        sc.settings, sc.router, sc.verifier = new, router, verifier
        sc.broker.connect_url = new.connect_url
        self.refresher.settings = new.refresh
        self.connector.settings = new
        self.offboarder.settings = new
        if self.admin is not None:
            self.admin.settings, self.admin.verifier = new, verifier
        self.settings = new
        return restart

    async def watch_config(self, path: str, interval: float = 1.0) -> None:
        """Reload when the file's content changes (a ConfigMap update swaps a symlink)."""
        import hashlib
        import logging

        from proxy.errors import CredproxyError
        from proxy.settings import load_settings

        log = logging.getLogger("credproxy.config")
        metric = self.sidecar.metrics.config_reloads

        def digest() -> str | None:
            try:
                return hashlib.sha256(open(path, "rb").read()).hexdigest()  # noqa: SIM115
            except OSError:
                return None

        last = digest()
        while True:
            await asyncio.sleep(interval)
            current = digest()
            if current is None or current == last:
                continue
            last = current
            try:
                restart = self.reload(load_settings(path))
            except CredproxyError as exc:
                metric.labels("rejected").inc()
                log.error("config reload rejected, the previous config keeps serving: %s",
                          exc)
                continue
            metric.labels("applied").inc()
            log.info("config reloaded (%d providers)%s", len(self.settings.providers),
                     f"; restart needed for: {', '.join(restart)}" if restart else "")

    async def start(self, *, serve_admin: bool = True, config_path: str | None = None) -> None:
        """Start background work; call once inside the running event loop."""
        await self.coordinator.start()
        self._tasks.append(asyncio.create_task(self.sidecar.broker.watch_vault()))
        if config_path:
            self._tasks.append(asyncio.create_task(self.watch_config(config_path)))
        if serve_admin and self.settings.admin:
            self.admin = AdminServer(
                self.settings, self.sidecar.verifier, self.connector, self.vault,
                [("proxy", self._listening), ("vault", self.vault.ping),
                 ("coordination", self.coordinator.check), ("draining", self._not_draining)],
                self.sidecar.metrics)
            await self.admin.start()

    async def _listening(self) -> None:
        """The proxy port accepts connections (the admin server starts a moment earlier)."""
        host, _, port = self.settings.listen.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), timeout=1.0)
        except (OSError, TimeoutError) as exc:
            raise CredproxyError("proxy port not accepting yet") from exc
        writer.close()

    async def _not_draining(self) -> None:
        if self.draining:
            raise CredproxyError("shutting down")

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
    if v.backend == "azure":
        from proxy.vault.azure import AzureKeyVault, FileTokenCredential

        assert v.url is not None
        credential = FileTokenCredential(v.token_file) if v.token_file else None
        vault: Vault = AzureKeyVault.from_url(
            v.url, vault_key=key, credential=credential, purge_on_delete=v.purge_on_delete,
            timeout=v.timeout, clock=clock,
            connection_verify=os.path.expanduser(v.ca_file) if v.ca_file else True,
            polling_interval=v.poll_interval, api_version=v.api_version,
            verify_challenge_resource=v.verify_challenge_resource)
        return vault, key
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
                         metrics=Metrics(),
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
    return App(settings, sidecar, vault, coordinator, refresher, http, connector, offboarder,
               secrets, environ)
