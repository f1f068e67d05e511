"""Run mitmproxy in-process with only the addons credproxy needs (`credproxy run`).

This is the one place that assembles a mitmproxy Master; everything it configures comes
from :class:`proxy.settings.Settings`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import certifi
from mitmproxy import master, options
from mitmproxy.addons import core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig

from addons.credproxy import CredentialInjector
from proxy.app import App
from proxy.hosts import HostPattern
from proxy.live import Snapshot
from proxy.settings import ProviderSettings, Settings

log = logging.getLogger("credproxy")


def upstream_trust_file(settings: Settings, directory: Path) -> str | None:
    """mitmproxy trusts one CA file: make it the public roots plus ``upstream_ca_file``, so
    adding a private CA does not drop the public ones."""
    if not settings.upstream_ca_file:
        return None
    extra = Path(settings.upstream_ca_file).expanduser().read_text(encoding="ascii")
    bundle = directory / "upstream-trust.pem"
    bundle.write_text(Path(certifi.where()).read_text(encoding="ascii") + "\n" + extra,
                      encoding="ascii")
    return str(bundle)


def intercept_pattern(settings: Settings,
                      retired: Sequence[ProviderSettings] = ()) -> list[str]:
    """For ``unrouted: tunnel``: regexes of the provider hosts, for mitmproxy's allow_hosts
    (see :meth:`proxy.hosts.HostPattern.intercept_regex`); everything else is tunnelled
    without interception. ``retired``: providers a reload removed, kept intercepted so the
    core refuses them."""
    pats = [HostPattern.parse(h).intercept_regex()
            for p in (*settings.providers, *retired) for h in p.ceiling()]
    # An empty allow_hosts would intercept everything: with no provider, match nothing.
    return pats or [r"(?!)"]


async def drain(m: master.Master, injector: CredentialInjector, app: App,
                grace: float) -> None:
    """Graceful stop: stop accepting connections, report not-ready, let in-flight requests
    finish (up to ``grace`` seconds), then shut down. Audit records are written as they
    happen, so there is nothing left to flush but the sinks, which close with the app."""
    app.draining = True
    log.info("shutting down: %d requests in flight", len(injector.in_flight))
    m.options.update(server=False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while injector.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if injector.in_flight:
        log.warning("shutdown grace over with %d requests still in flight",
                    len(injector.in_flight))
    m.shutdown()


def reopen_audit(app: App, sig: str) -> None:
    """Reopen the audit file after a rotation (SIGHUP, SIGUSR1); one log line either way."""
    reload = "; reloading the configuration" if sig == "SIGHUP" else ""
    try:
        reopened = app.sidecar.audit.reopen()
    except OSError as exc:
        log.error("%s: the audit file cannot be reopened (%s): credentialed requests are "
                  "refused (503 audit-unavailable) until it can%s", sig,
                  exc.strerror or exc, reload)
        return
    log.info("%s: %s%s", sig, "audit log reopened" if reopened
             else "audit log is stdout, nothing to reopen", reload)


async def serve(settings: Settings, app: App, *, grace: float = 25.0) -> None:
    """Serve until SIGTERM/SIGINT, then drain (see :func:`drain`). SIGHUP reloads the
    configuration (as a changed config file does) and reopens the audit file; SIGUSR1 only
    reopens the audit file."""
    ca_dir = Path(settings.ca_dir).expanduser()
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    host, _, port = settings.listen.rpartition(":")
    opts = options.Options(listen_host=host.strip("[]"), listen_port=int(port),
                           confdir=str(ca_dir))
    m = master.Master(opts, with_termlog=False)
    m.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        disable_h2c.DisableH2C(),
        errorcheck.ErrorCheck(),
    )
    injector = CredentialInjector(app)
    m.addons.add(injector)
    update: dict[str, object] = {
        "stream_large_bodies": settings.stream_large_bodies,
        "http2": settings.http2,
        # No upstream connection before the addon has decided: a refused request never
        # touches the destination.
        "connection_strategy": "lazy",
    }
    trust = upstream_trust_file(settings, ca_dir)
    if trust:
        update["ssl_verify_upstream_trusted_ca"] = trust
    if settings.unrouted == "tunnel":
        update["allow_hosts"] = intercept_pattern(settings)

        def follow_providers(new: Snapshot) -> None:
            # Switching to or from tunnel needs a restart (App.reload keeps the old mode),
            # so this stays tunnel: intercept the reloaded providers' hosts, and those of
            # providers it removed (from the same snapshot).
            if new.settings.unrouted == "tunnel":
                m.options.update(allow_hosts=intercept_pattern(new.settings,
                                                               new.router.retired))

        app.on_reload(follow_providers)
    opts.update(**update)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if stopping:  # a second signal: stop now
            m.shutdown()
            return
        stopping.append(asyncio.create_task(drain(m, injector, app, grace)))

    def on_hangup() -> None:
        reopen_audit(app, "SIGHUP")
        app.request_reload()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    loop.add_signal_handler(signal.SIGUSR1, reopen_audit, app, "SIGUSR1")
    log.info("credproxy listening on %s (providers: %s)", settings.listen,
             ", ".join(p.id for p in settings.providers) or "none")
    try:
        await m.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
