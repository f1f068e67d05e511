"""Wiring: build a :class:`proxy.sidecar.Sidecar` and its parts from :class:`Settings`."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

from proxy.admin import AdminServer
from proxy.audit import (
    CONFIG_LOADED,
    CONFIG_RELOADED,
    SYSTEM_ACTOR,
    Actor,
    AuditLog,
    CheckpointPolicy,
    new_instance_id,
    open_sink,
)
from proxy.auditexport import ExportCounters, OtlpExport
from proxy.checkpoint import Signer
from proxy.connect import Connector
from proxy.coordination import Coordinator, MemoryCoordinator
from proxy.errors import AuditUnavailable, ConfigError, CredproxyError, VaultUnavailable
from proxy.identity import IdentityVerifier, KeySource
from proxy.live import LiveConfig, Snapshot, SwapListener, client_secrets
from proxy.metrics import Metrics
from proxy.offboard import Offboarder
from proxy.provider_client import ProviderClient
from proxy.selfservice import Sessions
from proxy.settings import ProviderSettings, Settings
from proxy.sidecar import Sidecar
from proxy.suspensions import (
    FileSuspensionStore,
    Suspensions,
    SuspensionStore,
    SuspensionSync,
    file_path,
)
from proxy.tokens import TokenBroker
from proxy.vault.base import Vault
from proxy.vault.keys import derive_subkey, load_key
from proxy.vault.local import LocalVault

log = logging.getLogger("credproxy.config")

Check = Callable[[], Awaitable[None]]

# Readiness: a successful Key Vault read is reused for VAULT_OK_TTL seconds (one read per
# pod per 30 s). The admin server runs the checks concurrently, each bounded below the
# kubelet's 2 s probe timeout.
VAULT_OK_TTL = 30.0
# Key files read at start only (a reload that finds them changed says a restart is needed).
_KEY_FILES = frozenset({"vault.key_file", "audit.checkpoint.key_file"})


@dataclass
class App:
    """Everything a running proxy holds; :meth:`aclose` releases it. The configuration is
    ``live`` (:class:`proxy.live.LiveConfig`), which every component reads; nothing else
    holds a copy of it."""

    live: LiveConfig
    sidecar: Sidecar
    vault: Vault
    coordinator: Coordinator
    provider_client: ProviderClient  # the one provider client (refresh, connect, revoke)
    http: httpx2.AsyncClient
    connector: Connector
    offboarder: Offboarder
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    admin: AdminServer | None = None
    audit_export: OtlpExport | None = None  # the OTLP export, closed after the audit log
    key_ids: Mapping[str, str] = field(default_factory=dict)  # written at start
    # The self-service page's sessions (README "The self-service page").
    sessions: Sessions | None = None
    draining: bool = False
    # The kill switch (proxy.suspensions): keeps sidecar.suspensions equal to the store.
    suspension_sync: SuspensionSync | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # The config file and its files' digests as last applied (config.reloaded names those
    # that changed: a rotated signing key, a new client secret).
    _file_digests: dict[str, str] = field(default_factory=dict)
    # Set by request_reload (SIGHUP): the config watcher reloads at once, changed or not.
    _reload_now: asyncio.Event = field(default_factory=asyncio.Event)

    # Keys that only take effect on restart (sockets, stores, the audit chain).
    RESTART_KEYS = ("listen", "admin", "public_url", "ca_dir", "upstream_ca_file", "vault",
                    "coordination", "audit", "stream_large_bodies", "http2")

    @property
    def settings(self) -> Settings:
        """The running settings (those of ``live.current``)."""
        return self.live.current.settings

    def on_reload(self, listener: SwapListener) -> None:
        """Call ``listener(snapshot)`` after every applied reload (the mitmproxy adapter
        updates its options this way)."""
        self.live.on_swap(listener)

    def reload(self, new: Settings) -> list[str]:
        """Apply a new configuration to the running proxy: providers, identity, refresh and
        connect settings change live. The whole new :class:`Snapshot` is built first, so a
        bad config (say a provider whose client secret is missing, or an unreadable key
        file) raises and leaves the old one serving; then it is swapped in with one
        assignment (:meth:`LiveConfig.swap`): a request sees the old configuration or the
        new one, never part of each. A config that removes a provider, or a host from
        one, is refused unless the new file allows it (:func:`refuse_provider_removal`).
        Restart-only keys keep their running values (the sockets, stores and connect URLs
        in use); returns those that changed, which need a restart to take effect."""
        running = self.live.latest
        old = running.settings
        refuse_provider_removal(old, new)
        refuse_loosening(old, new)
        restart = [k for k in self.RESTART_KEYS if getattr(new, k) != getattr(old, k)]
        keep: dict[str, object] = {k: getattr(old, k) for k in self.RESTART_KEYS}
        if new.unrouted != old.unrouted and "tunnel" in (new.unrouted, old.unrouted):
            restart.append("unrouted")
            keep["unrouted"] = old.unrouted
        new = new.model_copy(update=keep)
        secrets = client_secrets(new, self.environ)
        # Hosts of removed providers stay known: requests to them are refused, never
        # passed through with the agent's own credentials (routes.refuse_retired).
        router = running.router.after_reload(old.providers, new.providers)
        verifier = running.verifier
        # Key files and secrets are re-read on every reload: the watcher reloads when one
        # of them changes (a rotated signing key). A JWKS URL refetches by itself.
        if new.identity != old.identity or not new.identity.jwks_url:
            verifier = IdentityVerifier(new.identity,
                                        KeySource.from_settings(new.identity, self.http,
                                                                self.environ),
                                        replay=self.coordinator)
        snapshot = Snapshot(new, router, verifier, secrets)
        # Swap: nothing below can fail, and nothing else holds configuration.
        self.live.swap(snapshot)
        self.sidecar.metrics.config_applied(settings_digest(new), time.time())
        return restart

    def request_reload(self) -> None:
        """Have the config watcher reload now, even if no file changed (SIGHUP): the same
        path, checks, log lines and metrics as a reload on a file change."""
        self._reload_now.set()

    async def _next_check(self, interval: float) -> bool:
        """Wait ``interval`` seconds or for :meth:`request_reload`; True for the latter."""
        try:
            await asyncio.wait_for(self._reload_now.wait(), interval)
        except TimeoutError:
            return False
        self._reload_now.clear()
        return True

    def watched_files(self, settings: Settings | None = None) -> list[str]:
        """The files the live-reloadable config reads besides itself: identity key files
        and providers' client_secret_file (restart-only keys' files are not watched)."""
        s = settings or self.settings
        files = [s.identity.jwks_file, s.identity.pem_file, s.identity.hs256_secret_file,
                 *(p.client_secret_file for p in s.providers)]
        return [os.path.expanduser(f) for f in files if f]

    def config_digest(self, path: str, pending: Settings | None = None) -> str | None:
        """A digest of the config file and every watched file (None: no config file);
        ``pending``: a config that was rejected, whose files are watched too (a secret
        file that arrives after the provider naming it retries the reload)."""
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError:
            return None
        names = self.watched_files()
        if pending is not None:
            names += [n for n in self.watched_files(pending) if n not in names]
        for name in names:
            h.update(b"\0" + name.encode() + b"\0")
            try:
                with open(name, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
            except OSError:
                h.update(b"missing")
        return h.hexdigest()

    async def watch_config(self, path: str, interval: float = 1.0) -> None:
        """Reload when the config file's content, or a file it references (key files,
        client secrets), changes (a ConfigMap or Secret volume update swaps a symlink)."""
        from proxy.settings import load_settings

        metric = self.sidecar.metrics.config_reloads
        pending: Settings | None = None
        last = self.config_digest(path)
        while True:
            requested = await self._next_check(interval)
            current = self.config_digest(path, pending)
            if current is None and requested:
                log.error("config reload requested but %s cannot be read; the previous "
                          "config keeps serving", path)
            if current is None or (current == last and not requested):
                continue
            # Settle: a file written in place (an editor, `cat > FILE`) is read only once
            # it has stopped changing, never half-way. Atomic replacement (write a temporary
            # file, rename it over; a ConfigMap's symlink swap) needs no wait but gets one.
            # A requested reload of unchanged files has nothing to wait for.
            settle = self.settings.reload.settle
            if settle > 0 and current != last:
                await asyncio.sleep(settle)
                if self.config_digest(path, pending) != current:
                    log.info("config file %s is still changing; reloading once it has not "
                             "changed for %.1f s", path, settle)
                    continue
            last = current
            pending = None
            # SIGHUP's sender is not known to the process; a file change is credproxy's own.
            actor = Actor("system", "sighup" if requested else "file-watch")
            try:
                new = load_settings(path)
                pending = new
                restart = self.reload(new)
                pending = None
            except CredproxyError as exc:
                last = self.config_digest(path, pending) or last
                metric.labels("rejected").inc()
                log.error("config reload rejected, the previous config keeps serving: %s",
                          exc)
                self.audit_config(CONFIG_RELOADED, "rejected", actor=actor,
                                  reason="config_rejected", detail=str(exc)[:300])
                continue
            # The new config may reference other files: watch those from now on.
            last = self.config_digest(path) or last
            digests = self.file_digests(path)
            changed = sorted(k for k, v in digests.items() if self._file_digests.get(k) != v)
            self._file_digests = digests
            # The vault key and the checkpoint signing key are read at start only: a new
            # one in place is recorded here, and takes effect at the next start.
            restart = [*restart, *(k for k in changed if k in _KEY_FILES)]
            if restart:
                metric.labels("applied_restart_required").inc()
                log.warning("config reloaded (%d providers); NOT applied until a restart: "
                            "%s (the running values are kept)", len(self.settings.providers),
                            ", ".join(restart))
            else:
                metric.labels("applied").inc()
                log.info("config reloaded (%d providers)", len(self.settings.providers))
            self.audit_config(
                CONFIG_RELOADED, "applied_restart_required" if restart else "applied",
                actor=actor,
                detail=(f"digest={settings_digest(self.settings)}"
                        f" changed={','.join(changed) or '-'}"
                        + (f" restart_required={','.join(restart)}" if restart else "")))

    def file_digests(self, path: str, settings: Settings | None = None) -> dict[str, str]:
        """SHA-256 (16 hex) of the config file and of each file it reads (key files, client
        secrets), by config key; an unreadable file is ``"missing"``."""
        s = settings or self.settings
        named = {"config": path, "identity.jwks_file": s.identity.jwks_file,
                 "identity.pem_file": s.identity.pem_file,
                 "identity.hs256_secret_file": s.identity.hs256_secret_file,
                 "vault.key_file": s.vault.key_file,
                 "audit.checkpoint.key_file": (s.audit.checkpoint.key_file
                                               if s.audit.checkpoint is not None else None),
                 **{f"providers.{p.id}.client_secret_file": p.client_secret_file
                    for p in s.providers}}
        out: dict[str, str] = {}
        for key, name in named.items():
            if not name:
                continue
            try:
                with open(os.path.expanduser(name), "rb") as f:
                    out[key] = hashlib.sha256(f.read()).hexdigest()[:16]
            except OSError:
                out[key] = "missing"
        return out

    def audit_config(self, event: str, outcome: str, *, actor: Actor,
                     reason: str | None = None, detail: str = "") -> None:
        """An administrative audit record about the configuration (``config.loaded``,
        ``config.reloaded``); a failure to write it is logged (the reload happened)."""
        try:
            self.sidecar.audit.record(event, outcome=outcome, reason=reason,
                                      detail=detail or None, actor=actor)
        except AuditUnavailable as exc:
            log.error("audit record %s not written: %s", event, exc)

    async def start(self, *, serve_admin: bool = True, config_path: str | None = None) -> None:
        """Start background work; call once inside the running event loop. With
        ``config_path`` (a served process), the trail gets ``config.loaded``: the running
        configuration's digest and the ids of the keys in use."""
        self.sidecar.metrics.config_applied(settings_digest(self.settings), time.time())
        if config_path:
            self._file_digests = self.file_digests(config_path)
            ids = " ".join(f"{k}={v}" for k, v in sorted(self.key_ids.items()))
            self.audit_config(CONFIG_LOADED, "loaded", actor=SYSTEM_ACTOR,
                              detail=f"digest={settings_digest(self.settings)} {ids}")
        await self.coordinator.start()
        if self.suspension_sync is not None:
            # Read once before serving (a restart honours every suspension at once), then
            # keep it current; a failed first read leaves credentialed requests refused.
            await self.suspension_sync.sync()
            self._tasks.append(asyncio.create_task(self.suspension_sync.run()))
        # Revocations by other processes: Redis tells every replica; the vault's epoch tells
        # processes sharing a local vault file, and Key Vault users without Redis.
        if not (self.settings.vault.backend == "azure"
                and self.settings.coordination.backend == "redis"):
            interval = float(getattr(self.vault, "epoch_interval", 0.25))
            self._tasks.append(asyncio.create_task(
                self.sidecar.broker.watch_vault(interval)))
        if config_path:
            self._tasks.append(asyncio.create_task(self.watch_config(config_path)))
        if serve_admin and self.settings.admin:
            # Key Vault is a billed, throttled remote API: reuse a success; the local
            # vault file is checked on every probe.
            vault_check: Check = (CachedSuccess(self.vault.ping, VAULT_OK_TTL)
                                  if self.settings.vault.backend == "azure" else self.vault.ping)
            # What this sidecar needs to serve: /startupz and /readyz (503 when one fails).
            checks: list[tuple[str, Check]] = [("proxy", self._listening),
                                               ("audit", self._audit_writable)]
            # Stores every pod shares: an outage degrades /readyz (200, named in the body)
            # instead of taking every agent pod out of its Service at once.
            dependencies: list[tuple[str, Check]] = [
                ("vault", vault_check), ("coordination", self.coordinator.check)]
            self.admin = AdminServer(self.live, self.connector, self.vault, checks,
                                     self.sidecar.metrics,
                                     dependencies=dependencies,
                                     draining=lambda: self.draining,
                                     liveness=[("audit", self.audit_liveness)],
                                     sessions=self.sessions, offboarder=self.offboarder,
                                     last_used=self.coordinator.last_uses,
                                     suspensions=self.sidecar.suspensions)
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

    async def _audit_writable(self) -> None:
        """Readiness: the audit sink can write (a file it can open, a stdout that is
        neither closed nor stalled); otherwise every credentialed request gets 503."""
        health = self.sidecar.audit.health()
        if not health.ok:
            raise AuditUnavailable(f"audit sink: {health.detail}",
                                   reason="audit_write_failed")

    def audit_liveness(self) -> str | None:
        """Liveness: None while live; what is wrong once the audit sink has failed for
        ``audit.liveness_after`` seconds with a fault only a restart cures (a closed or
        stuck stdout). A file sink reopens its path by itself and never fails liveness."""
        health = self.sidecar.audit.health()
        if health.ok or not health.restart_helps or health.failing_since is None:
            return None
        failing = time.monotonic() - health.failing_since
        if failing < self.settings.audit.liveness_after:
            return None
        return f"{health.detail} (for {failing:.0f} s)"

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.admin is not None:
            await self.admin.stop()
        await self.connector.aclose()
        await self.offboarder.aclose()
        await self.provider_client.aclose()
        await self.http.aclose()
        await self.coordinator.close()
        await self.vault.close()
        self.sidecar.audit.close()  # a final checkpoint first, when configured
        if self.audit_export is not None:
            await asyncio.to_thread(self.audit_export.close)  # flushes what is queued


class CachedSuccess:
    """A readiness check whose success is reused for ``ttl`` seconds (the Key Vault read
    is a billed, throttled API call); after a failure every call checks again."""

    def __init__(self, check: Check, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._check, self._ttl, self._clock = check, ttl, clock
        self._ok_at: float | None = None

    async def __call__(self) -> None:
        if self._ok_at is not None and self._clock() - self._ok_at < self._ttl:
            return
        self._ok_at = None
        await self._check()
        self._ok_at = self._clock()


def settings_digest(settings: Settings) -> str:
    """The running configuration's identity for ``credproxy_config_info{digest}``: sha256
    of its canonical JSON (secrets are referenced by name, never included), first 16 hex
    digits. Equal on every pod running the same effective config."""
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:16]


def refuse_provider_removal(old: Settings, new: Settings) -> None:
    """Raise :class:`ConfigError` when ``new`` removes a provider of ``old``, or a host no
    provider of ``new`` lists any more, unless ``new.reload.allow_provider_removal`` names
    that provider. A truncated or half-written file parses as exactly such a config (fewer
    providers, or none), and a removed provider's host would become unrouted: the agent's
    own ``Authorization`` would go there unaudited."""
    new_ids = {p.id for p in new.providers}
    new_hosts = {h for p in new.providers for h in p.ceiling()}
    allowed = set(new.reload.allow_provider_removal)
    removed: list[str] = []
    ids: list[str] = []
    for p in old.providers:
        lost = [h for h in p.ceiling() if h not in new_hosts]
        if p.id in allowed or (p.id in new_ids and not lost):
            continue
        ids.append(p.id)
        if p.id not in new_ids:
            removed.append(f"provider {p.id!r}")
        else:
            removed.append(f"host{'s' if len(lost) > 1 else ''} {', '.join(lost)} of "
                           f"provider {p.id!r}")
    if removed:
        raise ConfigError(
            f"refused: the new config removes {'; '.join(removed)} ({len(new.providers)} "
            "providers left). A truncated or half-written file looks like this, so the "
            "running config keeps serving. To remove them on purpose, add to the new file: "
            f"reload: {{allow_provider_removal: [{', '.join(ids)}]}}")


def refuse_loosening(old: Settings, new: Settings) -> None:
    """Raise :class:`ConfigError` when ``new`` relaxes a guard of ``old`` that a file cut
    short would also relax (its defaults are looser), unless ``new.reload.allow_loosening``
    names it: ``unrouted: deny`` becoming ``passthrough``; ``identity.one_time_jti`` turned
    off; a provider's ``methods`` allowlist dropped or widened; a provider's (or a
    resource's) ``grant_hosts`` dropped or given another template."""
    allowed = set(new.reload.allow_loosening)
    loosened: list[str] = []
    if old.unrouted == "deny" and new.unrouted == "passthrough":
        loosened.append("unrouted")
    if old.identity.one_time_jti and not new.identity.one_time_jti:
        loosened.append("identity.one_time_jti")
    now = {p.id: p for p in new.providers}
    for p in old.providers:
        q = now.get(p.id)
        if q is not None and p.methods is not None and (
                q.methods is None or not set(q.methods) <= set(p.methods)):
            loosened.append(f"providers.{p.id}.methods")
        # A provider that stops binding its grants to their tenant would send every
        # user's token to every host under its ceiling (docs/tenants.md).
        if q is not None and _unbinds(p, q):
            loosened.append(f"providers.{p.id}.grant_hosts")
    refused = [k for k in loosened if k not in allowed]
    if refused:
        raise ConfigError(
            f"refused: the new config relaxes {', '.join(refused)}. A file cut short drops "
            "trailing keys, whose defaults are looser, so the running config keeps serving. "
            "To relax them on purpose, add to the new file: reload: {allow_loosening: "
            f"[{', '.join(refused)}]}}")


def _unbinds(old: ProviderSettings, new: ProviderSettings) -> bool:
    """Whether ``new`` widens what ``old`` bound each grant to, for the provider or one of
    its resources still routed: its ``grant_hosts`` dropped, or a template added (a static
    host added there would receive every user's token)."""
    units = [(old.grant_hosts, new.grant_hosts)]
    units += [(r.grant_hosts, new.resources[rid].grant_hosts)
              for rid, r in old.resources.items() if rid in new.resources]
    return any(before and not set(after) <= set(before) for before, after in units) or any(
        before and not after for before, after in units)


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
    # A missing or emptied vault file is an error (init_vault makes the first one), unless
    # vault.create says this vault starts empty whenever its volume is new: then only a
    # missing file is created; an existing empty one is refused all the same.
    path = os.path.expanduser(v.path)
    create = v.create and not os.path.lexists(path)
    return LocalVault.open(path, key, clock=clock, timeout=v.timeout, create=create), key


def init_vault(settings: Settings, environ: Mapping[str, str] = os.environ) -> str:
    """Create the local vault file ``vault.path`` (0600, empty, sealed with the vault key):
    the explicit first run (``credproxy vault init``). Returns its path. Raises
    :class:`ConfigError` for a Key Vault backend (nothing to create), :class:`VaultError`
    when the file already exists, even empty (a truncated vault must be restored, not
    replaced), or cannot be created."""
    v = settings.vault
    if v.backend != "local":
        raise ConfigError(f"vault.backend: {v.backend} has no file to create; vault init is "
                          "for the local backend")
    path = os.path.expanduser(v.path)
    key = load_key(key_env=v.key_env if not v.key_file else None, key_file=v.key_file,
                   environ=environ)
    if os.path.lexists(path):
        raise VaultUnavailable(f"vault file {path} already exists; nothing changed (vault "
                               "init only creates a new vault)")
    LocalVault.open(path, key, timeout=v.timeout, create=True)  # holds nothing open
    return path


def _check_sink_file(key: str, sink: str, *, regular: bool = False) -> None:
    """``regular``: the path, when it exists, must be a regular file (the checkpoint sink,
    whose failures are quiet: refused now rather than missed later; a failing audit sink
    is loud, every request refused and the probes failing)."""
    path = Path(sink).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}: {sink} is a directory; name a file")
    if path.exists():
        if regular and not path.is_file():
            # The file sink writes only regular files (it follows them across rotation);
            # a device or FIFO would fail every write.
            raise ConfigError(f"{key}: {sink} is not a regular file; name a file (or "
                              "stdout)")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{key}: {sink} is not writable")
    elif not path.parent.is_dir():
        raise ConfigError(f"{key}: directory {path.parent} does not exist; create "
                          "it (the file itself is created, mode 0600)")
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot create {sink}: directory {path.parent} "
                          "is not writable")


def preflight(settings: Settings) -> None:
    """Check, before anything is created on disk, what would otherwise fail only once the
    proxy runs: the audit file's directory, the CA directory. Raises :class:`ConfigError`
    naming the key and the path."""
    if settings.audit.sink != "stdout":
        _check_sink_file("audit.sink", settings.audit.sink)
    cp = settings.audit.checkpoint
    if cp is not None and cp.sink is not None and cp.sink != "stdout":
        _check_sink_file("audit.checkpoint.sink", cp.sink, regular=True)
    ca = Path(settings.ca_dir).expanduser()
    if ca.exists() and not ca.is_dir():
        raise ConfigError(f"ca_dir: {settings.ca_dir} is not a directory")
    existing = ca
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not ca.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"ca_dir: cannot create {settings.ca_dir}: {existing} is not "
                          "writable")


def check_ports(settings: Settings) -> None:
    """Raise :class:`ConfigError` naming the key when ``listen`` or ``admin`` cannot be
    bound (in use, or an address this host does not have). A best effort before start-up;
    the servers' own bind errors are reported the same way."""
    for key, addr in (("listen", settings.listen), ("admin", settings.admin)):
        if not addr:
            continue
        host, _, port = addr.rpartition(":")
        try:
            infos = socket.getaddrinfo(host.strip("[]") or None, int(port),
                                       type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(f"{key}: cannot resolve {host!r}: {exc.strerror}") from None
        for family, kind, proto, _, sockaddr in infos:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(sockaddr)
                except OSError as exc:
                    raise ConfigError(f"{key}: cannot listen on {addr}: {exc.strerror}"
                                      + (" (another process is using the port)"
                                         if exc.errno == errno.EADDRINUSE else "")) from None


def fencing_period(settings: Settings) -> float:
    """How long refresh locks wait after Redis lost its data: the longest a lock holder can
    still be at work. Under the lock a refresh reads the shared cache and the vault twice,
    redeems the refresh token, then writes the vault; each step is bounded."""
    c, v = settings.coordination, settings.vault
    return settings.refresh.max_duration() + 3 * v.timeout + 3 * c.op_timeout + 1.0


def make_coordinator(settings: Settings, vault_key: bytes,
                     environ: Mapping[str, str] = os.environ,
                     clock: Callable[[], float] = time.time,
                     metrics: Metrics | None = None) -> Coordinator:
    if settings.coordination.backend == "redis":
        from proxy.coordination.redis import RedisCoordinator

        redis = RedisCoordinator(settings.coordination,
                                cache_key=derive_subkey(vault_key, "credproxy shared cache"),
                                environ=environ, clock=clock,
                                quiet_period=fencing_period(settings))
        if metrics is not None:
            redis.on_error = metrics.coordination_errors.inc
            metrics.fencing.set_function(lambda: float(redis.fencing_remaining() > 0))
            metrics.subscribed.set_function(lambda: float(redis.subscribed.is_set()))
        return redis
    return MemoryCoordinator(clock)


def suspension_store(settings: Settings, coordinator: Coordinator) -> SuspensionStore:
    """Where suspensions are kept (:mod:`proxy.suspensions`): in Redis with Redis
    coordination (every replica reads them), else in a file beside the local vault (or in
    ``ca_dir`` with Key Vault), which the one running proxy re-reads on change."""
    from proxy.coordination.redis import RedisCoordinator

    if isinstance(coordinator, RedisCoordinator):
        return coordinator
    v = settings.vault
    return FileSuspensionStore(file_path(v.backend, v.path, settings.ca_dir))


def build(settings: Settings, *, environ: Mapping[str, str] = os.environ,
          clock: Callable[[], float] = time.time) -> App:
    preflight(settings)
    tls = upstream_ssl_context(settings)
    secrets = client_secrets(settings, environ)
    http = httpx2.AsyncClient(verify=tls, timeout=10.0, trust_env=False)
    keys = KeySource.from_settings(settings.identity, http, environ)  # before the vault:
    vault, key = open_vault(settings, environ, clock)  # every config error comes first
    metrics = Metrics()
    coordinator = make_coordinator(settings, key, environ, clock, metrics)
    verifier = IdentityVerifier(settings.identity, keys, replay=coordinator, clock=clock)
    live = LiveConfig(Snapshot.build(settings, verifier, secrets=secrets))
    provider_client = ProviderClient(live, verify=tls, clock=clock)
    broker = TokenBroker(vault, coordinator, provider_client, live, metrics=metrics,
                         clock=clock)
    instance = settings.audit.instance or new_instance_id()
    checkpoint, signer = audit_checkpoint(settings, metrics)
    export = audit_export(settings, instance, metrics, environ)
    audit = AuditLog(open_sink(os.path.expanduser(settings.audit.sink)
                               if settings.audit.sink != "stdout" else "stdout",
                               events=metrics.audit_events(),
                               stall_timeout=settings.audit.stall_timeout,
                               buffer_bytes=settings.audit.buffer_bytes,
                               rotate_bytes=settings.audit.rotate_bytes,
                               rotate_keep=settings.audit.rotate_keep),
                     instance=instance,
                     fingerprint_key=derive_subkey(key, "credproxy audit fingerprint"),
                     clock=clock, checkpoint=checkpoint,
                     on_record=export.emit if export is not None else None)
    suspensions = Suspensions()
    sync = SuspensionSync(suspension_store(settings, coordinator), suspensions,
                          on_error=metrics.suspension_errors.inc)
    for kind in ("user", "context", "provider"):
        metrics.suspensions.labels(kind).set_function(
            lambda kind=kind: float(suspensions.count(kind)))  # type: ignore[misc]
    metrics.suspensions_synced.set_function(lambda: suspensions.synced_at)
    sidecar = Sidecar(live, broker, audit, suspensions)
    connector = Connector(live, vault, coordinator, audit,
                          state_key=derive_subkey(key, "credproxy connect state"), verify=tls,
                          clock=clock, client=provider_client)
    offboarder = Offboarder(live, vault, coordinator, audit, verify=tls,
                            client=provider_client)
    # Ids of the keys in use (never the keys): a change between starts shows in the trail.
    key_ids = {"vault_key": derive_subkey(key, "credproxy key id")[:8].hex()}
    if signer is not None:
        key_ids["checkpoint_key"] = signer.key_id
    return App(live, sidecar, vault, coordinator, provider_client, http, connector,
               offboarder, environ, audit_export=export, key_ids=key_ids,
               sessions=Sessions(derive_subkey(key, "credproxy self-service session")),
               suspension_sync=sync)


def audit_checkpoint(settings: Settings, metrics: Metrics
                     ) -> tuple[CheckpointPolicy | None, Signer | None]:
    """The checkpoint policy and signer of ``audit.checkpoint`` (None, None: off). Raises
    :class:`ConfigError` for an unreadable or non-Ed25519 key."""
    cp = settings.audit.checkpoint
    if cp is None:
        return None, None
    signer = Signer.from_file(cp.key_file)
    sink = (open_sink(os.path.expanduser(cp.sink) if cp.sink != "stdout" else "stdout")
            if cp.sink is not None else None)
    counter = metrics.audit_checkpoints
    return CheckpointPolicy(signer.detail, every_records=cp.every_records,
                            every_seconds=cp.every_seconds, sink=sink,
                            counted=lambda outcome: counter.labels(outcome).inc()), signer


def audit_export(settings: Settings, instance: str, metrics: Metrics,
                 environ: Mapping[str, str]) -> OtlpExport | None:
    """The OTLP export of ``audit.export`` (None: off), its counters wired to metrics."""
    if settings.audit.export.otlp is None:
        return None
    counter = metrics.audit_export
    counters = ExportCounters(
        on_change=lambda kind, n: counter.labels(kind).inc(n) if kind != "written" else None)
    metrics.audit_export_lag.set_function(lambda: float(counters.lag))
    return OtlpExport(settings.audit.export, instance=instance, environ=environ,
                      counters=counters)
