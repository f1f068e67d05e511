"""The admin server (a separate port from the proxy): health, readiness, and the web
connect flow (`/connect/{provider}` -> provider -> `/oauth/callback`)."""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path

from aiohttp import web

from proxy.connect import Connector, ConnectRejected
from proxy.errors import CredproxyError, ProxyRefusal
from proxy.identity import IdentityVerifier
from proxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from proxy.metrics import Metrics
from proxy.secret import Secret
from proxy.settings import Settings
from proxy.vault.base import Vault

log = logging.getLogger("credproxy.admin")


def _page(title: str, body: str, status: int) -> web.Response:
    text = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body><h1>{html.escape(title)}</h1><p>{html.escape(body)}</p>"
            "</body></html>")
    return web.Response(text=text, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


class AdminServer:
    def __init__(self, settings: Settings, verifier: IdentityVerifier, connector: Connector,
                 vault: Vault, ready_checks: list[tuple[str, object]],
                 metrics: Metrics) -> None:
        self._metrics = metrics
        self.settings = settings
        self.verifier = verifier
        self._connector = connector
        self._vault = vault
        self._checks = ready_checks
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/connect/{provider}", self.connect)
        app.router.add_get("/oauth/callback", self.callback)
        self.app = app

    async def start(self) -> None:
        assert self.settings.admin is not None
        host, _, port = self.settings.admin.rpartition(":")
        # access_log=None: /connect may carry a user context in its query string.
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host.strip("[]"), int(port)).start()
        log.info("admin server on %s", self.settings.admin)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def readyz(self, request: web.Request) -> web.Response:
        checks: dict[str, str] = {}
        ca = Path(os.path.expanduser(self.settings.ca_dir)) / "mitmproxy-ca.pem"
        checks["ca"] = "ok" if ca.is_file() else "missing"
        for name, check in self._checks:
            try:
                await check()  # type: ignore[operator]
                checks[name] = "ok"
            except (CredproxyError, OSError) as exc:
                checks[name] = f"unavailable: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return web.json_response({"ready": ready, "checks": checks},
                                 status=200 if ready else 503)

    async def connect(self, request: web.Request) -> web.StreamResponse:
        provider = request.match_info["provider"]
        raw = request.headers.get(self.verifier.header)
        if raw is None and self.settings.connect.context_query:
            raw = request.query.get("context")
        try:
            user = await self.verifier.verify(Secret(raw) if raw else None)
            if not user.permits(provider):
                raise ConnectRejected("provider_not_permitted",
                                      "this user context may not use that provider",
                                      user=user.user, provider=provider)
            scopes = request.query.get("scope")
            url = await self._connector.begin(
                user.user, provider, redirect_uri=self.settings.redirect_uri,
                scopes=scopes.replace(",", " ").split() if scopes else None,
                return_to=request.query.get("return_to"))
        except ProxyRefusal as exc:
            return _page("Sign-in not possible", f"user context rejected ({exc.reason})", 401)
        except ConnectRejected as exc:
            return _page("Sign-in not possible", f"{exc.detail} ({exc.reason})", 400)
        raise web.HTTPFound(url, headers={"Cache-Control": "no-store"})

    async def callback(self, request: web.Request) -> web.StreamResponse:
        try:
            done = await self._connector.complete(dict(request.query))
        except ConnectRejected as exc:
            return _page("Connection failed", f"{exc.detail} ({exc.reason})", 400)
        if done.return_to:
            raise web.HTTPSeeOther(done.return_to, headers={"Cache-Control": "no-store"})
        return _page("Connected", f"{done.user} is now connected to {done.provider}. "
                     "You can close this window.", 200)
