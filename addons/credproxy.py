"""mitmproxy addon: per-user credential injection. A thin adapter over :mod:`proxy.sidecar`.

Load it with ``credproxy run --config FILE`` or ``mitmdump -s addons/credproxy.py
--set credproxy_config=FILE --set stream_large_bodies=1m``.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import connection, ctx, exceptions, http

from addons.sink import RefusalSink
from proxy.app import App, build
from proxy.errors import (
    CredproxyError,
    InternalError,
    MisdirectedRequest,
    ProxyRefusal,
    UserContextInvalid,
)
from proxy.identity import context_from_proxy_authorization
from proxy.problems import problem_response
from proxy.routes import Destination, normalize_host
from proxy.secret import Secret
from proxy.settings import load_settings
from proxy.sidecar import Injection, Outbound

log = logging.getLogger("credproxy")
_META = "credproxy"
_PROXY_AUTH = "Proxy-Authorization"
_UNCONFIGURED = ("credproxy_config is not set: credproxy refuses every request (500 "
                 "internal-error). Load the addon with --set credproxy_config=FILE")


class CredentialInjector:
    def __init__(self, app: App | None = None) -> None:
        # `credproxy run` passes a built App; under plain mitmdump it comes from the option.
        self.app = app
        self._owns_app = False  # an App passed in is closed by whoever built it
        # Per client connection: the CONNECT authority and the Proxy-Authorization context.
        self._tunnels: dict[str, tuple[str, int]] = {}
        self._conn_context: dict[str, Secret | UserContextInvalid] = {}
        # Flows between requestheaders and their response/error: what a graceful shutdown
        # waits for.
        self.in_flight: set[str] = set()
        self._sink = RefusalSink()
        self._reported_unconfigured = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            name="credproxy_config", typespec=str, default="",
            help="Path to the credproxy YAML configuration. Required when the addon is "
                 "loaded with mitmdump -s; `credproxy run` sets it itself.",
        )

    def configure(self, updated: set[str]) -> None:
        if "credproxy_config" not in updated or self.app is not None:
            return
        if not ctx.options.credproxy_config:
            # An error logged this early makes mitmdump exit before it listens.
            self._report_unconfigured()
            return
        try:
            self.app = build(load_settings(ctx.options.credproxy_config))
            self._owns_app = True
        except CredproxyError as exc:
            raise exceptions.OptionsError(str(exc)) from exc

    async def running(self) -> None:
        if self.app is None:
            self._report_unconfigured()  # a host that configured no option at all
        elif self._owns_app:
            await self.app.start(config_path=ctx.options.credproxy_config)

    def _report_unconfigured(self) -> None:
        # Fail closed: without an app, requestheaders refuses every request.
        if not self._reported_unconfigured:
            self._reported_unconfigured = True
            log.error(_UNCONFIGURED)

    async def done(self) -> None:
        await self._sink.aclose()
        if self.app is not None and self._owns_app:
            await self.app.aclose()

    def client_disconnected(self, client: connection.Client) -> None:
        self._tunnels.pop(client.id, None)
        self._conn_context.pop(client.id, None)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        conn = flow.client_conn.id
        self._tunnels[conn] = (flow.request.host, flow.request.port)
        context = self._take_proxy_authorization(flow)
        if context is not None:
            self._conn_context[conn] = context

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        self.in_flight.add(flow.id)
        if self.app is None:
            await self._refuse(flow, InternalError("credproxy is not configured; nothing was "
                                                   "forwarded", reason="unconfigured"))
            return
        sidecar = self.app.sidecar
        req = flow.request
        # Strip every user-context credential first, whatever happens next.
        values = req.headers.get_all(sidecar.verifier.header)
        if values:
            del req.headers[sidecar.verifier.header]
        connection_context = self._take_proxy_authorization(flow)
        if connection_context is None:
            connection_context = self._conn_context.get(flow.client_conn.id)
        token: Secret | None = None
        error: UserContextInvalid | None = None
        if len(values) > 1:
            error = UserContextInvalid(f"{sidecar.verifier.header} was sent more than once",
                                       reason="duplicate-header")
        elif values:
            token = Secret(values[0])
        elif isinstance(connection_context, UserContextInvalid):
            error = connection_context
        else:
            token = connection_context
        try:
            outbound = Outbound(
                id=flow.id, method=req.method, destination=self._destination(flow),
                host_header=req.host_header, path=req.path.split("?", 1)[0],
                sni=flow.client_conn.sni, context_token=token, context_error=error,
            )
            decision = await sidecar.decide(outbound)
        except ProxyRefusal as refusal:
            await self._refuse(flow, refusal)
            return
        except Exception:  # noqa: BLE001
            # mitmproxy would log a hook error and forward the request anyway: fail closed.
            log.exception("internal error deciding %s", flow.id)
            await self._refuse(flow, InternalError("internal error; nothing was forwarded"))
            return
        if isinstance(decision, Injection):
            # Replace, never merge: every client-sent variant of Authorization and of the
            # inject header goes, then the one credential is set.
            for name in decision.remove:
                req.headers.pop(name, None)
            req.headers[decision.header] = decision.value.reveal()
            flow.metadata[_META] = (outbound, decision)
            canonical = outbound.destination.host.strip("[]")
            if req.host != canonical:
                # "Docs.Example.com." and "docs.example.com" are one host; connect (and send
                # SNI, which must not end in a dot) using the canonical spelling.
                req.host = canonical

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(_META) is None or flow.response is None:
            return
        # A refusal replaces the body in `response`; it must not have streamed out already.
        if flow.response.status_code == 401 or "invalid_token" in flow.response.headers.get(
            "WWW-Authenticate", ""
        ):
            flow.response.stream = False

    async def response(self, flow: http.HTTPFlow) -> None:
        self.in_flight.discard(flow.id)
        self._sink.forget(flow)
        meta = flow.metadata.pop(_META, None)
        if meta is None or flow.response is None or self.app is None:
            return
        outbound, injection = meta
        refusal: ProxyRefusal | None
        try:
            refusal = await self.app.sidecar.upstream_response(
                outbound, injection, flow.response.status_code, flow.response.headers)
        except ProxyRefusal as exc:
            refusal = exc
        except Exception:  # noqa: BLE001
            log.exception("internal error checking the response to %s", flow.id)
            refusal = InternalError("internal error; the upstream answer was withheld")
        if refusal is not None:
            # The response body has not been sent (responseheaders kept it from streaming).
            flow.response = self._problem(flow, refusal)

    def error(self, flow: http.HTTPFlow) -> None:
        self.in_flight.discard(flow.id)
        self._sink.forget(flow)
        flow.metadata.pop(_META, None)

    async def _refuse(self, flow: http.HTTPFlow, refusal: ProxyRefusal) -> None:
        """Answer ``flow`` with a problem before anything is sent upstream. mitmproxy may
        already have decided to stream the body, so the answer comes from the refusal sink
        (see :mod:`addons.sink`), never from ``flow.response``."""
        await self._sink.reroute(flow, self._problem(flow, refusal))

    def _problem(self, flow: http.HTTPFlow, refusal: ProxyRefusal) -> http.Response:
        p = problem_response(refusal, request_id=flow.id)
        cause = refusal.__cause__
        log.info("refused %s %s: %s (%s)%s", flow.request.method, flow.request.pretty_host,
                 refusal.slug, refusal.reason, f": {cause}" if cause is not None else "")
        return http.Response.make(p.status, p.body, p.headers)

    def _take_proxy_authorization(self, flow: http.HTTPFlow
                                  ) -> Secret | UserContextInvalid | None:
        values = flow.request.headers.get_all(_PROXY_AUTH)
        if not values:
            return None
        # Consumed here: it must never be forwarded upstream.
        del flow.request.headers[_PROXY_AUTH]
        if len(values) > 1:
            return UserContextInvalid("Proxy-Authorization was sent more than once",
                                      reason="duplicate-header")
        try:
            return context_from_proxy_authorization(values[0])
        except UserContextInvalid as exc:
            return exc

    def _destination(self, flow: http.HTTPFlow) -> Destination:
        tunnel = self._tunnels.get(flow.client_conn.id)
        try:
            if tunnel is not None:
                # Inside a CONNECT tunnel the real destination is the CONNECT authority,
                # whatever the Host header inside says.
                return Destination(normalize_host(tunnel[0]), tunnel[1],
                                   tls=flow.client_conn.tls_established)
            return Destination(normalize_host(flow.request.host), flow.request.port,
                               tls=flow.request.scheme == "https")
        except ValueError:
            raise MisdirectedRequest("the destination is not a valid host",
                                     reason="bad_destination") from None


addons = [CredentialInjector()]
