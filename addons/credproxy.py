"""mitmproxy addon: per-user credential injection. A thin adapter over :mod:`proxy.sidecar`.

Load it with ``credproxy run --config FILE`` or ``mitmdump -s addons/credproxy.py
--set credproxy_config=FILE --set stream_large_bodies=1m``.

Bodies stream. Every response goes to the agent as it arrives (SSE, NDJSON, gRPC, long
polls, downloads), except an upstream's answer the proxy replaces (a credentialed request
answered 401 or ``error="invalid_token"``: the agent gets ``reauth-required`` at once and
the upstream's body is never read) and a small JSON answer of a provider that declares
revoked-token signals in bodies, which is read whole first. A request body of unknown length
(chunked, HTTP/2 without ``content-length``: gRPC, uploads) streams to the upstream once the
decision is made; one of known length up to ``stream_large_bodies`` is read whole first. A
refusal is answered before the request body is read (:mod:`addons.compat`, item 7), except
for a JSON POST (:func:`proxy.mcp.may_be_mcp`, at most 1 MiB): it may be an MCP
request, decided in ``request`` once its body is here, so that the audit names the tool and
a refusal is the JSON-RPC error an MCP client understands (:func:`proxy.mcp.refusal_answer`).

The hooks read the flow, hand every decision to the core (:class:`proxy.headers.HeaderPolicy`
for the header section, :func:`proxy.identity.choose_context` for the user context,
:meth:`proxy.sidecar.Sidecar.decide` for the rest) and apply the result. Per-flow state lives
in this addon's own maps, keyed by flow id and cleared when the flow ends, never in
``flow.metadata``: other addons snapshot flows (``flow.get_state()``, ``flow.copy()``), and a
credential must not be part of a snapshot.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer, layers

from addons import compat
from proxy import mcp
from proxy.app import App, build
from proxy.dialect import ApiSignals, api_signal, is_json
from proxy.errors import (
    CredproxyError,
    InternalError,
    MalformedRequest,
    MisdirectedRequest,
    ProxyRefusal,
    UserContextInvalid,
)
from proxy.headers import HeaderPolicy, ReadHeaders
from proxy.hosts import normalize_host
from proxy.identity import ContextCandidate, choose_context, connection_context
from proxy.live import Snapshot
from proxy.problems import refusal_response
from proxy.routes import Destination
from proxy.secret import Secret
from proxy.settings import load_settings
from proxy.sidecar import Injection, Outbound
from proxy.suspensions import Suspension

compat.install()

log = logging.getLogger("credproxy")
_UNCONFIGURED = ("credproxy_config is not set: credproxy refuses every request (500 "
                 "internal-error). Load the addon with --set credproxy_config=FILE")
# Read on a CONNECT when no app is configured yet (only Proxy-Authorization matters there).
_DEFAULT_POLICY = HeaderPolicy("X-User-Context")


# What the response hook needs of a credentialed request. (A plain tuple: mitmdump -s loads
# this file outside sys.modules, where a dataclass cannot be defined.)
_Injected = tuple[Outbound, Injection]


class CredentialInjector:
    def __init__(self, app: App | None = None) -> None:
        # `credproxy run` passes a built App; under plain mitmdump it comes from the option.
        self.app = app
        self._owns_app = False  # an App passed in is closed by whoever built it
        # Per client connection: the CONNECT authority and the Proxy-Authorization context.
        self._tunnels: dict[str, tuple[str, int]] = {}
        self._conn_context: dict[str, ContextCandidate] = {}
        # Per flow, between requestheaders and response/error: what a graceful shutdown
        # waits for, and what the response hook needs of a credentialed request.
        self.in_flight: set[str] = set()
        # Per client connection: its flows still in flight (mitmproxy runs no response or
        # error hook for a flow still waiting for an upstream connection when the client
        # goes; client_disconnected closes them).
        self._client_flows: dict[str, set[str]] = {}
        self._injected: dict[str, _Injected] = {}
        # Every flow in flight, by id: the kill switch cuts those a suspension stops.
        self._flows: dict[str, http.HTTPFlow] = {}
        # Flows cut by a suspension (their error hook names the reason).
        self._cut: set[str] = set()
        # Flows that may be MCP requests, decided once their small body is here.
        self._pending: dict[str, tuple[ReadHeaders, Snapshot]] = {}
        # Flows this addon refused itself before forwarding.
        self._refused: set[str] = set()
        # Flows whose small JSON answer is read whole for a revoked-token signal.
        self._held: set[str] = set()
        self._reported_unconfigured = False
        if app is not None:
            self._attach(app)

    def _attach(self, app: App) -> None:
        if app.sidecar.suspensions is not None:
            app.sidecar.suspensions.on_added(self._suspended)

    def _suspended(self, added: list[Suspension]) -> None:
        """Suspensions came into force: cut the credentialed exchanges they stop that are
        still under way (a response still streaming, an upload, one waiting for its
        answer). mitmproxy honours the kill at the next piece of either body
        (:mod:`addons.compat`, item 11); audited ``request.failed``, reason
        ``suspended``."""
        for flow_id, (_, injection) in list(self._injected.items()):
            user, provider = injection.user, injection.provider.id
            if not any(s.matches(user.user, user.context_id, provider) for s in added):
                continue
            flow = self._flows.get(flow_id)
            if flow is not None and flow.killable:
                flow.kill()
                self._cut.add(flow_id)
                log.info("request %s cut: its user, user context or provider was suspended",
                         flow_id)

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
            self._attach(self.app)
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
        if self.app is not None and self._owns_app:
            await self.app.aclose()

    def client_disconnected(self, client: connection.Client) -> None:
        self._tunnels.pop(client.id, None)
        self._conn_context.pop(client.id, None)
        compat.forget(client.id)
        for flow_id in self._client_flows.pop(client.id, set()) & self.in_flight:
            self._pending.pop(flow_id, None)
            # A flow mitmproxy ended without a response or error hook (it was still waiting
            # for an upstream connection): not in flight any more, and its audit trail ends.
            self.in_flight.discard(flow_id)
            self._flows.pop(flow_id, None)
            self._cut.discard(flow_id)
            self._held.discard(flow_id)
            injected = self._injected.pop(flow_id, None)
            if self.app is not None and injected is not None:
                # A fault compat refused first (a trailer section) is the reason, even
                # when the client closed before mitmproxy reported the flow's error.
                reason = compat.failure_reason(flow_id, client.id,
                                               default="client_disconnected")
                try:
                    self.app.sidecar.exchange_failed(injected[0], injected[1], reason=reason)
                except CredproxyError:
                    log.exception("could not record the failure of %s", flow_id)

    def _policy(self) -> HeaderPolicy:
        return self.app.live.current.headers if self.app is not None else _DEFAULT_POLICY

    def next_layer(self, data: layer.NextLayer) -> None:
        """After mitmproxy's NextLayer chose how to handle a connection (it runs first):
        never relay bytes no decision covered.

        * mitmproxy relays a tunnel as raw TCP when its first bytes do not look like HTTP
          (a leading CRLF or space, a tab for a space); the user context and any header would
          pass undecided. Read it as HTTP instead: what is not HTTP gets a 400 problem.
        * ``unrouted: tunnel`` leaves alone what its intercept list does not match; a
          provider's address under another spelling (``[0::1]``, ``127.1``) would be
          tunnelled with no decision. The router decides instead, on the normalised
          address (:mod:`proxy.hosts`)."""
        chosen = data.layer
        if not isinstance(chosen, layers.TCPLayer):
            return
        address = data.context.server.address
        where = f"{address[0]}:{address[1]}" if address else "-"
        if chosen.flow is not None:
            log.info("connection to %s is not HTTP at its start; read as HTTP (no raw relay)",
                     where)
            data.layer = compat.http_layer_for(data.context)
            return
        if self.app is None or address is None:
            return
        tls = starts_like_tls_record(data.data_client())
        try:
            dest = Destination(normalize_host(address[0]), address[1], tls=tls)
        except ValueError:
            # No destination a decision can name (``0.0.0.0``, which Linux connects to
            # loopback): intercept, and the request path refuses it (421).
            data.layer = compat.intercept_layer(data.context, data.data_client())
            return
        if self.app.live.current.router.match(dest) is not None:
            log.info("tunnel to %s is a provider's address (%s): intercepted, not tunnelled",
                     where, dest)
            data.layer = compat.intercept_layer(data.context, data.data_client())

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        conn = flow.client_conn.id
        try:
            read = self._policy().read(flow.request.headers.fields)
        except MalformedRequest as refusal:
            # Answered instead of the 200 that would open the tunnel.
            flow.response = self._problem(flow, refusal)
            return
        # Consumed here: a CONNECT's header section is never forwarded anyway.
        flow.request.headers = http.Headers(list(read.fields))
        self._tunnels[conn] = (flow.request.host, flow.request.port)
        context = connection_context(read)
        if context is not None:
            self._conn_context[conn] = context

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        self.in_flight.add(flow.id)
        self._flows[flow.id] = flow
        self._client_flows.setdefault(flow.client_conn.id, set()).add(flow.id)
        if self.app is None:
            await self._refuse(flow, InternalError("credproxy is not configured; nothing was "
                                                   "forwarded", reason="unconfigured"))
            return
        sidecar = self.app.sidecar
        # One configuration for the whole request: the header policy that reads it, the
        # user-context header it is taken from, and the decision.
        config = self.app.live.current
        req = flow.request
        try:
            # One reading of the header section, before anything else: malformed fields are
            # refused, identity headers (every spelling) and Connection-nominated fields go.
            read = sidecar.read_headers(req.headers.fields, config)
        except ProxyRefusal as refusal:
            await self._refuse(flow, refusal)
            return
        except Exception:  # noqa: BLE001
            log.exception("internal error reading %s", flow.id)
            await self._refuse(flow, InternalError("internal error; nothing was forwarded"))
            return
        req.headers = http.Headers(list(read.fields))
        if not req.stream and mcp.may_be_mcp(req.method, read.fields):
            # Perhaps an MCP request (a small JSON POST): decided in ``request``, once its
            # body is here, so that the audit names the tool and a refusal is a JSON-RPC
            # error with the request's id (proxy.mcp).
            self._pending[flow.id] = (read, config)
            return
        await self._decide(flow, read, config,
                           mcp.read_call(read.fields, None, method=req.method))

    async def _decide(self, flow: http.HTTPFlow, read: ReadHeaders, config: Snapshot,
                      call: mcp.McpCall | None) -> None:
        """Decide on the request (:meth:`Sidecar.decide`) and apply the decision."""
        assert self.app is not None
        req = flow.request
        try:
            outbound = self._outbound(flow, read, config.verifier.header, call)
            decision = await self.app.sidecar.decide(outbound, config)
        except ProxyRefusal as refusal:
            await self._refuse(flow, refusal)
            return
        except Exception:  # noqa: BLE001
            # mitmproxy would log a hook error and forward the request anyway: fail closed.
            log.exception("internal error deciding %s", flow.id)
            await self._refuse(flow, InternalError("internal error; nothing was forwarded"))
            return
        if outbound.target is not None:
            # The absolute-form target named the tunnel's authority: forward in origin-form
            # (RFC 9112 section 3.2.1), which every server reads the same way.
            req.authority = ""
        if isinstance(decision, Injection):
            # Replace, never merge: every client-sent spelling of Authorization and of the
            # inject header goes, then the one credential is set.
            req.headers = http.Headers(list(HeaderPolicy.without(req.headers.fields,
                                                                 decision.remove)))
            req.headers[decision.header] = decision.value.reveal()
            self._injected[flow.id] = (outbound, decision)
            canonical = outbound.destination.host.strip("[]")
            if req.host != canonical:
                # "Docs.Example.com." and "docs.example.com" are one host; connect (and send
                # SNI, which must not end in a dot) using the canonical spelling.
                req.host = canonical
        if "content-length" not in req.headers:
            # A body of unknown length is a stream (gRPC client and bidirectional streams,
            # chunked uploads): forward it as it comes. (With no body at all mitmproxy
            # ignores this.)
            req.stream = True

    def _outbound(self, flow: http.HTTPFlow, read: ReadHeaders, context_header: str,
                  call: mcp.McpCall | None = None) -> Outbound:
        req = flow.request
        conn = flow.client_conn.id
        context = choose_context(read, context_header, self._conn_context.get(conn))
        in_tunnel = conn in self._tunnels
        # Inside a tunnel mitmproxy keeps an HTTP/1 absolute-form target as it came
        # (``authority``); for HTTP/2 the authority is :authority, read as the Host header.
        target = (req.authority if in_tunnel and req.authority
                  and not (req.is_http2 or req.is_http3) else None)
        return Outbound(
            id=flow.id, method=req.method, destination=self._destination(flow),
            host_header=req.host_header, path=req.path,
            sni=flow.client_conn.sni,
            context_token=context if isinstance(context, Secret) else None,
            context_error=context if isinstance(context, UserContextInvalid) else None,
            target=target, mcp=call,
        )

    async def request(self, flow: http.HTTPFlow) -> None:
        """The whole request has arrived. A request that may be MCP (``requestheaders``) is
        decided now, with its body read (:func:`proxy.mcp.read_call`). Its trailer section
        is never forwarded: trailer fields are a second header section that next hops merge
        differently, and no decision covered them. A buffered request with trailers is
        answered 400 (nothing was sent upstream); HTTP/1 trailers and those after a streamed
        body are refused earlier, in :mod:`addons.compat` (item 2)."""
        pending = self._pending.pop(flow.id, None)
        if flow.response or flow.error or not flow.live:
            return
        if not flow.request.trailers:
            if pending is not None:
                call = mcp.read_call(flow.request.headers.fields, flow.request.raw_content,
                                     method=flow.request.method)
                await self._decide(flow, pending[0], pending[1], call)
            return
        if flow.request.stream:  # (compat refuses these before this hook; never forward)
            flow.request.trailers = None
            return
        injected = self._injected.pop(flow.id, None)
        if injected is not None:
            self._failed(flow, injected, "client_protocol_error")
        self._refused.add(flow.id)
        self._finish(flow)
        flow.response = self._problem(flow, MalformedRequest(
            "the request carries a trailer section, which credproxy does not forward; send "
            "the fields as headers", reason="trailers"))

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The upstream's status and header section arrived: decide on them now, so that the
        body can stream. A credentialed request answered 401 or ``error="invalid_token"``
        (:meth:`Sidecar.upstream_response`) gets its problem instead: the replacement goes
        out at once in place of the upstream's answer, whose body is never read
        (:mod:`addons.compat`, item 8). A small JSON answer from a provider that declares
        revoked-token signals in bodies (``api_signals``: Slack's HTTP 200
        ``{"ok": false, "error": "token_revoked"}``) is read whole and examined in
        ``response``. Everything else streams."""
        response = flow.response
        if response is None or flow.id in self._refused:
            return
        injected = self._injected.get(flow.id)
        if injected is not None and self.app is not None:
            refusal: ProxyRefusal | None
            try:
                refusal = await self.app.sidecar.upstream_response(
                    injected[0], injected[1], response.status_code, response.headers)
            except ProxyRefusal as exc:
                refusal = exc
            except Exception:  # noqa: BLE001
                log.exception("internal error checking the response to %s", flow.id)
                refusal = InternalError("internal error; the upstream answer was withheld")
            if refusal is not None:
                flow.response = self._problem(flow, refusal)
                return
            if _may_signal(injected[1].provider.api_signals, response):
                self._held.add(flow.id)
                return
        response.stream = True

    async def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)
        self._cut.discard(flow.id)
        injected = self._injected.pop(flow.id, None)
        held = flow.id in self._held
        self._held.discard(flow.id)
        if self._forget_refused(flow) or flow.response is None or self.app is None:
            return
        if held and injected is not None:
            await self._check_signal(flow, injected)
        if flow.server_conn.timestamp_start is not None:  # it went upstream
            self._observe(flow, injected[1].provider.id if injected else "-")

    async def _check_signal(self, flow: http.HTTPFlow, injected: _Injected) -> None:
        """A held JSON answer (see ``responseheaders``) carrying one of the provider's
        revoked-token signals is answered exactly like an upstream 401
        (:meth:`Sidecar.token_rejected`); any other goes out unchanged."""
        assert self.app is not None and flow.response is not None
        outbound, injection = injected
        signals = injection.provider.api_signals
        response = flow.response
        raw = response.raw_content
        if raw is None or len(raw) > signals.max_bytes:
            return  # streamed after all (longer than stream_large_bodies), or too long
        body = response.get_content(strict=False) or b""
        reason = api_signal(signals, response.status_code,
                            response.headers.get("content-type"), body)
        if reason is None:
            return
        refusal: ProxyRefusal
        try:
            refusal = await self.app.sidecar.token_rejected(
                outbound, injection, response.status_code, signal=reason)
        except ProxyRefusal as exc:
            refusal = exc
        except Exception:  # noqa: BLE001
            log.exception("internal error checking the response to %s", flow.id)
            refusal = InternalError("internal error; the upstream answer was withheld")
        flow.response = self._problem(flow, refusal)

    def _observe(self, flow: http.HTTPFlow, provider: str) -> None:
        """Latency of an exchange that went upstream (mitmproxy's timestamps, seconds)."""
        assert self.app is not None and flow.response is not None
        metrics = self.app.sidecar.metrics
        req, resp = flow.request, flow.response
        if resp.timestamp_end is not None:
            metrics.request_duration.labels(provider).observe(
                max(0.0, resp.timestamp_end - req.timestamp_start))
        if req.timestamp_end is not None:
            metrics.upstream_duration.labels(provider).observe(
                max(0.0, resp.timestamp_start - req.timestamp_end))

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)
        refused = self._forget_refused(flow)
        self._held.discard(flow.id)
        injected = self._injected.pop(flow.id, None)
        # mitmproxy answers the client next (when it still can): name this request there.
        compat.register_request(flow.client_conn.id, flow.id)
        if self.app is None or refused:
            return
        reason = compat.failure_reason(flow.id, flow.client_conn.id)
        if flow.id in self._cut:
            self._cut.discard(flow.id)
            reason = "suspended"
        log.info("request %s to %s failed (%s): %s", flow.id, flow.request.pretty_host,
                 reason, flow.error.msg if flow.error else "-")
        self._failed(flow, injected, reason)

    def _failed(self, flow: http.HTTPFlow, injected: _Injected | None, reason: str) -> None:
        """Count (and, for a credentialed request, audit) an exchange that broke after the
        decision; an audit failure here is logged (the request is over)."""
        if self.app is None:
            return
        outbound, injection = injected if injected else (None, None)
        try:
            self.app.sidecar.exchange_failed(outbound, injection, reason=reason)
        except CredproxyError:
            log.exception("could not record the failure of %s", flow.id)

    def _finish(self, flow: http.HTTPFlow) -> None:
        """``flow`` is no longer in flight."""
        self.in_flight.discard(flow.id)
        self._flows.pop(flow.id, None)
        self._pending.pop(flow.id, None)
        flows = self._client_flows.get(flow.client_conn.id)
        if flows is not None:
            flows.discard(flow.id)

    def _forget_refused(self, flow: http.HTTPFlow) -> bool:
        if flow.id in self._refused:
            self._refused.discard(flow.id)
            return True
        return False

    async def _refuse(self, flow: http.HTTPFlow, refusal: ProxyRefusal) -> None:
        """Answer ``flow`` with a problem before anything is sent upstream: at once, before
        its body (:mod:`addons.compat`, item 7)."""
        self._refused.add(flow.id)
        self._finish(flow)
        flow.response = self._problem(flow, refusal)

    def _problem(self, flow: http.HTTPFlow, refusal: ProxyRefusal) -> http.Response:
        """The refusal in the client's protocol (a JSON-RPC error for an MCP request,
        :func:`proxy.mcp.refusal_answer`; a gRPC status; else an RFC 9457 problem), to a
        HEAD request without its body (RFC 9110 section 9.3.2: mitmproxy would send the
        body anyway, and the client would read it as the next response); logged without
        any header value or body byte."""
        cause = refusal.__cause__
        method = flow.request.method
        log.info("refused %s %s %s: %s (%s)%s", flow.id,
                 method if method.isascii() and method.isalpha() else "?",
                 flow.request.pretty_host, refusal.slug, refusal.reason,
                 f": {cause}" if cause is not None else "")
        call = _mcp_call(flow)
        answer = (mcp.refusal_answer(refusal, call) if call is not None else
                  refusal_response(refusal, request_id=flow.id,
                                   content_type=flow.request.headers.get("content-type", "")))
        if method.upper() == "HEAD":
            response = http.Response.make(answer.status, b"", answer.headers)
            response.headers.pop("content-length", None)
            return response
        return http.Response.make(answer.status, answer.body, answer.headers)

    def _destination(self, flow: http.HTTPFlow) -> Destination:
        tunnel = self._tunnels.get(flow.client_conn.id)
        try:
            if tunnel is not None:
                # Inside a CONNECT tunnel the real destination is the CONNECT authority,
                # whatever the Host header or the request-target inside says.
                return Destination(normalize_host(tunnel[0]), tunnel[1],
                                   tls=flow.client_conn.tls_established)
            return Destination(normalize_host(flow.request.host), flow.request.port,
                               tls=flow.request.scheme == "https")
        except ValueError:
            raise MisdirectedRequest("the destination is not a valid host",
                                     reason="bad_destination") from None


def _mcp_call(flow: http.HTTPFlow) -> mcp.McpCall | None:
    """The MCP call ``flow`` makes (:func:`proxy.mcp.read_call`), from its body when that
    was read whole (a small JSON POST), else from its ``Mcp-*`` headers alone."""
    req = flow.request
    fields = req.headers.fields
    body = None
    if not req.stream and mcp.may_be_mcp(req.method, fields):
        body = req.raw_content
    return mcp.read_call(fields, body, method=req.method)


def _may_signal(signals: ApiSignals, response: http.Response) -> bool:
    """Whether an answer may carry one of ``signals`` and is small enough to hold: JSON
    with a declared length up to ``max_bytes``, or no declared length (mitmproxy
    streams it anyway past ``stream_large_bodies``)."""
    if not signals.reauth:
        return False
    if not is_json(response.headers.get("content-type")):
        return False
    length = response.headers.get("content-length")
    return length is None or (length.isdigit() and int(length) <= signals.max_bytes)


addons = [CredentialInjector()]
