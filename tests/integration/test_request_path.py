"""The request path holds against how real next hops read headers and targets (issue: header
spellings, absolute-form targets in a tunnel, Connection nominations, obsolete line folding
and control bytes, chunked trailers, HTTP/2 bodies of unknown length for an HTTP/1 provider,
IPv6 providers in tunnel mode). A real ``credproxy run``, real TLS, real clients (raw
sockets, curl, requests) and upstreams that show what a next hop parsed: a strict HTTP/1.1
server and a real WSGI server (tests/integration/upstreams.py)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from devstack.certs import make_leaf
from devstack.procs import free_port, start_server, tcp_check
from devstack.stack import Stack, build_stack, wait_until
from tests.integration import rawhttp
from tests.integration.upstreams import NginxUpstream, RawUpstream, WsgiUpstream

pytestmark = pytest.mark.integration

RAW, WSGI, DOWN, NGINX = "raw", "wsgi", "down", "nginx"


class Env:
    def __init__(self, stack: Stack, raw: RawUpstream, wsgi: WsgiUpstream,
                 nginx: NginxUpstream) -> None:
        self.stack, self.raw, self.wsgi, self.nginx = stack, raw, wsgi, nginx
        self.users = iter(range(1_000_000))

    def user(self) -> str:
        name = f"u{next(self.users)}"
        for provider in ("docs", RAW, WSGI, DOWN, NGINX):
            self.stack.vault_put(name, self.stack.grant(name), provider=provider)
        return name

    def token(self, user: str, provider: str = RAW) -> str:
        async def get() -> Any:
            vault = self.stack._open_vault()
            try:
                return await vault.get(user, provider)
            finally:
                await vault.close()

        import asyncio

        grant = asyncio.run(get())
        return str(grant.tokens.access_token.reveal())

    @property
    def raw_authority(self) -> str:
        return f"localhost:{self.raw.port}"

    def audit(self) -> list[dict[str, Any]]:
        return self.stack.audit_records()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    stack = build_stack(tmp_path_factory.mktemp("request-path"), start_proxy=False)
    pki = stack.workdir / "pki"
    raw = RawUpstream(pki / "server.pem", pki / "server.key")
    wsgi = WsgiUpstream(pki / "server.pem", pki / "server.key")
    nginx = NginxUpstream(pki / "server.pem", pki / "server.key", stack.workdir / "nginx")
    docs = stack.config["providers"][0]
    stack.config["providers"] += [
        {**docs, "id": RAW, "hosts": [f"localhost:{raw.port}"]},
        {**docs, "id": WSGI, "hosts": [f"localhost:{wsgi.port}"],
         "inject": {"header": "X-Api-Key", "format": "{access_token}"}},
        {**docs, "id": NGINX, "hosts": [f"localhost:{nginx.port}"],
         "inject": {"header": "X-Api-Key", "format": "{access_token}"}},
        # A provider whose API is down: nothing listens on its port.
        {**docs, "id": DOWN, "hosts": [f"localhost:{free_port()}"]},
    ]
    # HTTP/2 towards agents: every HTTP/1 row below is unaffected; the h2 rows use it.
    stack.write_config(http2=True)
    stack.start_proxy()
    try:
        yield Env(stack, raw, wsgi, nginx)
    finally:
        stack.close()
        raw.close()
        wsgi.close()
        nginx.close()


def _raw_request(env: Env, head: bytes, *, authority: str | None = None,
                 timeout: float = 10.0) -> bytes:
    """CONNECT to ``authority`` (the raw provider by default), TLS, send ``head`` verbatim,
    return everything the proxy answered until it closed or went quiet."""
    authority = authority or env.raw_authority
    host, _, port = env.stack.proxy_url.removeprefix("http://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    with sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(4096)
        assert buf.startswith(b"HTTP/1.1 200"), buf
        ctx = ssl.create_default_context(cafile=str(env.stack.mitm_ca))
        with ctx.wrap_socket(sock, server_hostname=authority.rsplit(":", 1)[0]) as tls:
            return _send_and_read(tls, head)


def _send_and_read(tls: ssl.SSLSocket, head: bytes) -> bytes:
    tls.sendall(head)
    out = b""
    try:
        while chunk := tls.recv(65536):
            out += chunk
            if _complete(out):
                break
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    return out


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
        if name.strip().lower() == b"transfer-encoding":
            return body.endswith(b"\r\n\r\n")
    return False


def _status(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


# --- 1. header-name spellings -----------------------------------------------------------------

@pytest.mark.parametrize("lookalike", ["X_User_Context", "x_user_context", "X-User_Context",
                                       "Proxy_Authorization"])
def test_lookalike_identity_headers_are_refused_on_routed_requests(env: Env,
                                                                   lookalike: str) -> None:
    user, mallory = env.user(), env.user()
    marker = f"/m-{lookalike}-{user}"
    head = (f"GET {marker} HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
            f"X-User-Context: {env.stack.context(user)}\r\n"
            f"{lookalike}: {env.stack.context(mallory)}\r\nConnection: close\r\n\r\n").encode()
    status, headers, body = _status(_raw_request(env, head))
    assert (status, headers["x-credproxy-error"]) == (407, "user-context-invalid")
    assert json.loads(body)["reason"] == "lookalike_header"
    assert not env.raw.saw(marker)


def test_a_wsgi_provider_reads_one_credential_whatever_the_client_spells(env: Env) -> None:
    """The fault: ``X_Api_Key: attacker-key`` beside the injected ``X-Api-Key`` reached a WSGI
    server as ``HTTP_X_API_KEY = "attacker-key,<token>"``."""
    user = env.user()
    for spoof in ("X_Api_Key", "x_api_key", "X-API-KEY", "X-Api_Key", "Authorization"):
        r = requests.get(f"https://localhost:{env.wsgi.port}/x",
                         headers={"X-User-Context": env.stack.context(user),
                                  spoof: "attacker-key"},
                         proxies={"https": env.stack.proxy_url},
                         verify=str(env.stack.mitm_ca), timeout=15)
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["HTTP_X_API_KEY"] == env.token(user, WSGI), spoof
        assert "attacker-key" not in json.dumps(seen)
        assert "HTTP_AUTHORIZATION" not in seen
        assert "HTTP_X_USER_CONTEXT" not in seen


@pytest.mark.parametrize("lookalike", ["X_User_Context", "x_user_context", "X-USER-CONTEXT",
                                       "Proxy_Authorization", "proxy_authorization"])
def test_identity_headers_never_reach_an_unrouted_wsgi_server(env: Env, lookalike: str) -> None:
    """An unrouted WSGI upstream (the proxy lists it under no provider) never sees a user
    context under any spelling; the agent's own Authorization passes, as documented."""
    with socket.socket() as s:  # the wsgi provider's port is routed; use another server
        s.bind(("127.0.0.1", 0))
    pki = env.stack.workdir / "pki"
    other = WsgiUpstream(pki / "server.pem", pki / "server.key")
    try:
        r = requests.get(f"https://127.0.0.1:{other.port}/x",
                         headers={lookalike: env.stack.context("bob"),
                                  "Authorization": "Bearer agent-own"},
                         proxies={"https": env.stack.proxy_url},
                         verify=str(env.stack.mitm_ca), timeout=15)
        assert r.status_code == 200, r.text
        seen = r.json()
        assert "HTTP_X_USER_CONTEXT" not in seen and "HTTP_PROXY_AUTHORIZATION" not in seen
        assert seen["HTTP_AUTHORIZATION"] == "Bearer agent-own"
    finally:
        other.close()


# --- 2. absolute-form targets inside the tunnel --------------------------------------------

@pytest.mark.parametrize(("target", "status", "problem"), [
    ("https://other-tenant.example/x", 421, "misdirected-request"),
    ("https://other-tenant.example:{port}/x", 421, "misdirected-request"),
    ("https://localhost:1/x", 421, "misdirected-request"),
    ("https://localhost/x", 421, "misdirected-request"),  # default port 443, not the tunnel's
    ("https://LOCALHOST.evil.example:{port}/x", 421, "misdirected-request"),
    ("https://[::1]:{port}/x", 421, "misdirected-request"),
    # Userinfo in a request-target: mitmproxy's own parser refuses it, as a problem too.
    ("https://user@localhost:{port}/x", 400, "malformed-request"),
])
def test_an_absolute_form_target_for_another_authority_is_refused(
        env: Env, target: str, status: int, problem: str) -> None:
    user = env.user()
    marker = f"/abs-{user}"
    absolute = target.format(port=env.raw.port).replace("/x", marker)
    r = rawhttp.request(env.stack.proxy_url, connect=env.raw_authority,
                        host_header=env.raw_authority, absolute=absolute,
                        headers={"X-User-Context": env.stack.context(user)},
                        ca_file=str(env.stack.mitm_ca))
    # Not a bare 404: the refusal looks like every other one, whatever the request form.
    assert r.status == status and r.problem == problem, r.body
    assert r.headers["Content-Type"] == "application/problem+json"
    if status == 421:
        assert r.json()["instance"].startswith("urn:credproxy:request:")
    assert not env.raw.saw(marker)


@pytest.mark.parametrize(("target", "expected"), [
    # Before: nginx served this from the other virtual host, with the user's credential.
    ("https://other-tenant.example:{port}/x", None),
    ("https://other-tenant.example/x", None),
    ("https://localhost:{port}/x", "vhost=provider"),
])
def test_nginx_front_end_never_gets_a_credential_for_another_virtual_host(
        env: Env, target: str, expected: str | None) -> None:
    user = env.user()
    authority = f"localhost:{env.nginx.port}"
    before = env.nginx.access_log().count("\n")
    r = rawhttp.request(env.stack.proxy_url, connect=authority, host_header=authority,
                        absolute=target.format(port=env.nginx.port),
                        headers={"X-User-Context": env.stack.context(user),
                                 "X_Api_Key": "attacker-key"},
                        ca_file=str(env.stack.mitm_ca))
    if expected is None:
        assert r.status == 421 and r.problem == "misdirected-request", r.body
        assert env.nginx.access_log().count("\n") == before  # nothing reached nginx
        # The next hop really routes by the target: the same bytes sent to nginx directly
        # are served by the other virtual host.
        direct = _direct_tls(env.nginx.port, f"GET {target.format(port=env.nginx.port)} "
                             f"HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
        assert b"vhost=other-tenant" in direct
    else:
        assert r.status == 200, r.body
        assert r.body.decode().strip() == (f"{expected} auth= key={env.token(user, NGINX)}")


def _direct_tls(port: int, request: str) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the test's own server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        return _send_and_read(tls, request.encode())


def test_an_agreeing_absolute_form_target_goes_out_in_origin_form(env: Env) -> None:
    user = env.user()
    marker = f"/agree-{user}"
    r = rawhttp.request(env.stack.proxy_url, connect=env.raw_authority,
                        host_header=env.raw_authority,
                        absolute=f"https://{env.raw_authority}{marker}",
                        headers={"X-User-Context": env.stack.context(user)},
                        ca_file=str(env.stack.mitm_ca))
    assert r.status == 200, r.body
    seen = r.json()
    assert seen["line"] == f"GET {marker} HTTP/1.1"
    assert ["Authorization", f"Bearer {env.token(user)}"] in seen["headers"]


# --- 3. Connection nominating protected headers ----------------------------------------------

@pytest.mark.parametrize("connection", ["keep-alive, Authorization", "Authorization",
                                        "close, authorization, X-User-Context", "TE, Keep-Alive"])
def test_connection_never_nominates_the_credential(env: Env, connection: str) -> None:
    user = env.user()
    marker = f"/conn-{user}"
    head = (f"GET {marker} HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
            f"Connection: {connection}\r\nTE: trailers\r\nKeep-Alive: timeout=5\r\n"
            f"Authorization: Bearer client-value\r\n"
            f"X-User-Context: {env.stack.context(user)}\r\n\r\n").encode()
    status, _, body = _status(_raw_request(env, head))
    assert status == 200, body
    seen = json.loads(body)
    names = [k.lower() for k, _ in seen["headers"]]
    assert ["Authorization", f"Bearer {env.token(user)}"] in seen["headers"]
    assert names.count("authorization") == 1 and "x-user-context" not in names
    for value in (v for k, v in seen["headers"] if k.lower() == "connection"):
        assert {o.strip().lower() for o in value.split(",")} <= {"keep-alive", "close"}
    if "keep-alive" in connection.lower():
        assert "keep-alive" not in names  # the nominated Keep-Alive field went too


def test_a_grant_survives_a_request_that_tried_to_drop_its_token(env: Env) -> None:
    """Before: a next hop honouring ``Connection: Authorization`` dropped the token, the API
    answered 401 and the user's valid grant was marked reauth-required."""
    user = env.user()
    head = (f"GET /ok HTTP/1.1\r\nHost: {env.raw_authority}\r\nConnection: Authorization\r\n"
            f"X-User-Context: {env.stack.context(user)}\r\n\r\n").encode()
    assert _status(_raw_request(env, head))[0] == 200
    with env.stack.client_via(env.stack.proxy_url, context=env.stack.context(user)) as c:
        assert c.get(f"https://{env.raw_authority}/again").status_code == 200


# --- 4. obsolete line folding and control bytes ---------------------------------------------

@pytest.mark.parametrize(("field", "reason"), [
    pytest.param(b"X-Foo: a\r\n Authorization: Bearer client-value\r\n", "obs_fold", id="obs_fold"),
    pytest.param(b"X-Foo: a\r\n\tX-User-Context: forged\r\n", "obs_fold", id="obs_fold-tab"),
    pytest.param(b"X-Foo: a\x00b\r\n", "control_character", id="nul"),
    pytest.param(b"X-Foo: a\x7fb\r\n", "control_character", id="del"),
    pytest.param(b"X-Foo: a\rb\r\n", "obs_fold", id="bare-cr"),
    pytest.param(b"X-Foo : v\r\n", "bad_field_name", id="space-before-colon"),
    pytest.param(b"X\x00Foo: v\r\n", "bad_field_name", id="nul-in-name"),
])
@pytest.mark.parametrize("routed", [True, False])
def test_malformed_header_sections_are_400_before_any_decision(env: Env, field: bytes,
                                                               reason: str,
                                                               routed: bool) -> None:
    user = env.user()
    marker = f"/malformed-{user}"
    echo_port = env.stack.echo_server(tls=True).url.rsplit(":", 1)[1]
    authority = env.raw_authority if routed else f"127.0.0.1:{echo_port}"
    head = (f"GET {marker} HTTP/1.1\r\nHost: {authority}\r\n"
            f"X-User-Context: {env.stack.context(user)}\r\n").encode() + field + \
        b"Connection: close\r\n\r\n"
    answer = _raw_request(env, head, authority=authority)
    status, headers, body = _status(answer)
    assert status == 400, answer[:300]
    assert headers.get("x-credproxy-error") == "malformed-request"
    assert headers.get("content-type") == "application/problem+json"
    assert json.loads(body)["reason"] in (reason, "client_protocol_error")
    assert not env.raw.saw(marker)
    assert b"client-value" not in answer and b"forged" not in answer


# --- 5. chunked trailers ------------------------------------------------------------------

@pytest.mark.parametrize("size", [5, 2 * 1024 * 1024], ids=["small", "streamed"])
def test_a_request_with_trailers_is_answered_at_once(env: Env, size: int) -> None:
    user = env.user()
    marker = f"/trail-{size}-{user}"
    chunk = b"x" * size
    head = (f"POST {marker} HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
            f"X-User-Context: {env.stack.context(user)}\r\nTransfer-Encoding: chunked\r\n"
            f"Trailer: X-Checksum\r\n\r\n").encode() + \
        b"%x\r\n%s\r\n0\r\nX-Checksum: abc\r\nAuthorization: Bearer trailer-value\r\n\r\n" % (
            len(chunk), chunk)
    started = time.monotonic()
    answer = _raw_request(env, head, timeout=20)
    status, headers, body = _status(answer)
    assert status == 400 and headers["x-credproxy-error"] == "malformed-request", answer[:300]
    assert json.loads(body)["reason"] == "trailers"
    assert time.monotonic() - started < 15  # answered, not left hanging until a timeout
    # Nothing of the trailer section reached the provider as a field.
    assert all("trailer-value" not in json.dumps(q.headers) + json.dumps(q.trailers)
               for q in env.raw.requests)
    # The audit trail says what happened after the injection record (the problem is sent
    # before mitmproxy's error hook runs, so the record may follow the answer a moment later).
    def events() -> list[tuple[str, str | None]]:
        return [(r["event"], r.get("reason")) for r in env.audit()
                if (r.get("request") or {}).get("path") == marker]

    wait_until(lambda: len(events()) == 2)
    assert events() == [("credential.injected", None),
                        ("request.failed", "client_protocol_error")]


def test_an_http1_response_trailer_section_is_dropped_and_the_response_ends(env: Env) -> None:
    """The response streams (its head and body are out before its trailers arrive): the
    trailer fields are dropped and the response ends normally, the connection reusable."""
    user = env.user()
    head = (f"GET /x/trailers HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
            f"X-User-Context: {env.stack.context(user)}\r\nConnection: close\r\n\r\n").encode()
    answer = _raw_request(env, head, timeout=20)
    status, headers, body = _status(answer)
    assert status == 200 and headers["transfer-encoding"] == "chunked", answer
    assert body == b"5\r\nhello\r\n0\r\n\r\n", answer  # no trailer fields
    assert b"x-checksum" not in answer.lower()


# --- mitmproxy's own failures reach the agent as problems (any client protocol) ---------------

@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
@pytest.mark.parametrize("routed", [True, False])
def test_an_unreachable_destination_is_a_502_problem(env: Env, http: str, routed: bool) -> None:
    user = env.user()
    if routed:
        down = next(p for p in env.stack.config["providers"] if p["id"] == DOWN)
        authority = down["hosts"][0]
    else:
        authority = f"127.0.0.1:{free_port()}"
    out = subprocess.run(
        ["curl", "-sS", http, "-x", env.stack.proxy_url, "--cacert", str(env.stack.mitm_ca),
         "-H", f"X-User-Context: {env.stack.context(user)}", "-D", "-",
         f"https://{authority}/unreachable-{user}"],
        capture_output=True, timeout=30, check=True)
    # curl -D shows the proxy's CONNECT answer first, then the response.
    _connect, _, rest = out.stdout.partition(b"\r\n\r\n")
    head, _, body = rest.partition(b"\r\n\r\n")
    assert b" 502" in head.split(b"\r\n")[0], out.stdout
    assert b"x-credproxy-error: upstream-unreachable" in head.lower()
    assert b"mitmproxy" not in out.stdout.lower()
    problem = json.loads(body)
    assert problem["reason"] == "upstream_unreachable"
    if routed:
        # The trail does not end at credential.injected: it says nothing was sent.
        def events() -> list[tuple[str, str | None]]:
            return [(r["event"], r.get("reason")) for r in env.audit()
                    if (r.get("request") or {}).get("path") == f"/unreachable-{user}"]

        wait_until(lambda: len(events()) == 2)
        assert events() == [("credential.injected", None),
                            ("request.failed", "upstream_unreachable")]
        if http == "--http1.1":
            request_id = problem["instance"].rsplit(":", 1)[1]
            proxy = env.stack.proxy
            assert proxy is not None  # log lines are written by a thread: wait for it
            wait_until(lambda: request_id in proxy.stderr_text())


# --- 6. HTTP/2 agent, HTTP/1 provider, body of unknown length --------------------------------

def test_an_http2_upload_of_unknown_length_is_framed_for_the_http1_provider(
        env: Env, tmp_path: Path) -> None:
    user = env.user()
    marker = f"/h2-{user}"
    smuggled = (f"POST /smuggled-{user} HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
                "Content-Length: 400\r\n\r\n").encode()
    before = len(env.raw.requests)
    out = subprocess.run(
        ["curl", "-sS", "--http2", "-x", env.stack.proxy_url, "--cacert",
         str(env.stack.mitm_ca), "-H", f"X-User-Context: {env.stack.context(user)}",
         "-T", "-", "-X", "POST", f"https://{env.raw_authority}{marker}",
         "-w", "\n%{http_version} %{http_code}"],
        input=smuggled, capture_output=True, timeout=30, check=True)
    body, _, status = out.stdout.rpartition(b"\n")
    assert status == b"2 200", out.stderr
    seen = json.loads(body)
    assert seen["line"] == f"POST {marker} HTTP/1.1"
    assert seen["body"].encode() == smuggled  # the body arrived as a body
    assert not env.raw.saw(f"/smuggled-{user}")  # and never as a request of its own
    new = env.raw.requests[before:]
    assert [q.line for q in new] == [f"POST {marker} HTTP/1.1"]
    assert new[0].header("Transfer-Encoding") == ["chunked"]


def test_an_http2_request_with_content_length_keeps_it(env: Env) -> None:
    user = env.user()
    marker = f"/h2cl-{user}"
    out = subprocess.run(
        ["curl", "-sS", "--http2", "-x", env.stack.proxy_url, "--cacert",
         str(env.stack.mitm_ca), "-H", f"X-User-Context: {env.stack.context(user)}",
         "--data-binary", "hello", f"https://{env.raw_authority}{marker}"],
        capture_output=True, timeout=30, check=True)
    seen = json.loads(out.stdout)
    assert seen["body"] == "hello"
    assert ["Content-Length", "5"] in [[k.title(), v] for k, v in seen["headers"]]


# --- latency is measured per provider -------------------------------------------

def test_latency_histograms_per_provider(env: Env) -> None:
    user = env.user()
    with env.stack.client_via(env.stack.proxy_url, context=env.stack.context(user)) as c:
        assert c.get(f"https://{env.raw_authority}/timed").status_code == 200
    echo = env.stack.echo_server(tls=True)
    with env.stack.client_via(env.stack.proxy_url) as c:
        assert c.get(f"{echo.url}/healthz").status_code == 200
    text = requests.get(f"http://{env.stack.config['admin']}/metrics", timeout=10).text

    def sample(name: str, labels: str) -> float:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{name}{{{labels}}}"))
        return float(line.rsplit(" ", 1)[1])

    for provider in (RAW, "-"):
        assert sample("credproxy_request_duration_seconds_count", f'provider="{provider}"') >= 1
        assert sample("credproxy_upstream_duration_seconds_count", f'provider="{provider}"') >= 1


# --- found by a break test: framing, request-targets, raw relays, chunk syntax ----------------

@pytest.mark.parametrize("nominated", ["Content-Length", "content-length",
                                       "keep-alive, Content-Length", "Transfer-Encoding",
                                       "Host"])
@pytest.mark.parametrize("routed", [True, False])
def test_connection_can_never_nominate_framing_or_routing(env: Env, nominated: str,
                                                          routed: bool) -> None:
    """``Connection: Content-Length`` once made the proxy drop the framing and forward the
    body raw: the provider parsed an attacker's second request."""
    user = env.user()
    marker, smuggled = f"/frame-{user}", f"/smuggled-{user}"
    inner = (f"DELETE {smuggled} HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
             "Authorization: Bearer attacker-chosen\r\nContent-Length: 0\r\n\r\n").encode()
    if "transfer" in nominated.lower():
        framing, body = "Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (
            len(inner), inner)
    else:
        framing, body = f"Content-Length: {len(inner)}\r\n", inner
    authority = env.raw_authority if routed else f"127.0.0.1:{env.raw.port}"
    head = (f"POST {marker} HTTP/1.1\r\nHost: {authority}\r\n"
            f"X-User-Context: {env.stack.context(user)}\r\nConnection: {nominated}\r\n"
            f"{framing}\r\n").encode()
    status, headers, answer = _status(_raw_request(env, head + body, authority=authority))
    assert (status, headers.get("x-credproxy-error")) == (400, "malformed-request"), answer
    assert json.loads(answer)["reason"] == "bad_connection"
    assert not env.raw.saw(marker) and not env.raw.saw(smuggled)


@pytest.mark.parametrize(("target", "reason"), [
    ("https://other-tenant.example/x", "bad_target"),
    ("other-tenant.example/x", "bad_target"),
    ("//other-tenant.example/x", "ambiguous_target"),
])
def test_an_http2_path_must_be_origin_form(env: Env, target: str, reason: str) -> None:
    """An HTTP/2 ``:path`` holding a URL reached the HTTP/1 provider as an absolute-form
    target, which nginx routed to the other virtual host with the user's credential."""
    user = env.user()
    before = env.nginx.access_log().count("\n")
    out = subprocess.run(
        ["curl", "-sS", "--http2", "-x", env.stack.proxy_url, "--cacert",
         str(env.stack.mitm_ca), "-H", f"X-User-Context: {env.stack.context(user)}",
         "--request-target", target, "-w", "\n%{http_code}",
         f"https://localhost:{env.nginx.port}/"],
        capture_output=True, timeout=30, check=True)
    body, _, status = out.stdout.rpartition(b"\n")
    assert status == b"400", out.stdout
    assert json.loads(body)["reason"] == reason
    assert env.nginx.access_log().count("\n") == before


def test_a_double_slash_target_on_a_credentialed_request_is_refused(env: Env) -> None:
    user = env.user()
    head = (f"GET //other-tenant.example/x-{user} HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
            f"X-User-Context: {env.stack.context(user)}\r\nConnection: close\r\n\r\n").encode()
    status, _, body = _status(_raw_request(env, head))
    assert status == 400 and json.loads(body)["reason"] == "ambiguous_target"
    assert not env.raw.saw(f"x-{user}")


@pytest.mark.parametrize("prefix,line,decided", [
    # RFC 9112 section 2.2: a server SHOULD ignore an empty line before the request-line.
    pytest.param(b"\r\n", "GET {p} HTTP/1.1", True, id="leading-crlf"),
    pytest.param(b"\r\n\r\n", "GET {p} HTTP/1.1", True, id="two-leading-crlfs"),
    # Either decided or refused (mitmproxy's parser reads some of these as requests):
    pytest.param(b" ", "GET {p} HTTP/1.1", None, id="leading-space"),
    pytest.param(b"\x00", "GET {p} HTTP/1.1", None, id="leading-nul"),
    pytest.param(b"", "GET\t{p}\tHTTP/1.1", None, id="tabs"),
    pytest.param(b"", "G3T {p} HTTP/1.1", None, id="digit-in-method"),
])
@pytest.mark.parametrize("routed", [True, False])
def test_bytes_that_do_not_start_like_http_are_never_relayed_raw(
        env: Env, prefix: bytes, line: str, decided: bool | None, routed: bool) -> None:
    """mitmproxy relayed such a tunnel as raw TCP: the user context and a client-chosen
    Authorization reached the upstream with no decision. Now every such connection is read
    as HTTP: decided like any request, or refused at once (never left hanging)."""
    user = env.user()
    marker = f"/raw-{user}"
    authority = env.raw_authority if routed else f"127.0.0.1:{env.raw.port}"
    head = prefix + (f"{line.format(p=marker)}\r\nHost: {authority}\r\n"
                     f"X-User-Context: {env.stack.context(user)}\r\n"
                     "Authorization: Bearer client-chosen\r\nConnection: close\r\n\r\n").encode()
    started = time.monotonic()
    answer = _raw_request(env, head, authority=authority)
    assert time.monotonic() - started < 8, "no answer: the connection hung"
    for q in env.raw.requests:
        text = json.dumps(q.headers).lower()
        assert "x-user-context" not in text
        if routed:
            assert "client-chosen" not in text
    if decided or (decided is None and env.raw.saw(marker)):
        assert _status(answer)[0] == 200 and env.raw.saw(marker), answer[:200]
        if routed:  # decided: the user's own token, and only it
            seen = next(q for q in env.raw.requests if marker in q.line)
            assert seen.header("Authorization") == [f"Bearer {env.token(user)}"]
    else:
        assert not env.raw.saw(marker)
        assert answer == b"" or b"malformed-request" in answer, answer[:200]


def test_an_empty_line_between_pipelined_requests_is_ignored(env: Env) -> None:
    user = env.user()
    one = (f"GET /p1-{user} HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
           f"X-User-Context: {env.stack.context(user)}\r\n\r\n")
    two = (f"\r\nGET /p2-{user} HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
           f"X-User-Context: {env.stack.context(user)}\r\nConnection: close\r\n\r\n")
    host, _, port = env.stack.proxy_url.removeprefix("http://").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"CONNECT {env.raw_authority} HTTP/1.1\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(4096)
        ctx = ssl.create_default_context(cafile=str(env.stack.mitm_ca))
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall((one + two).encode())
            out = b""
            while out.count(b"HTTP/1.1 200") < 2:
                chunk = tls.recv(65536)
                assert chunk, out
                out += chunk
    assert env.raw.saw(f"/p1-{user}") and env.raw.saw(f"/p2-{user}")


@pytest.mark.parametrize("body", [
    pytest.param(b"5\nhello\n0\n\n", id="bare-lf"),
    pytest.param(b"5\rhello\r0\r\r", id="bare-cr"),
    pytest.param(b"1ffffffffffffffff5\r\nhello\r\n0\r\n\r\n", id="size-overflows-64-bits"),
    pytest.param(b"8000000000000000\r\nhello\r\n0\r\n\r\n", id="size-2-to-the-63"),
    pytest.param(b"f" * 5000, id="endless-size-line"),
    pytest.param(b"5\r\nhelloEXTRA\r\n0\r\n\r\n", id="more-data-than-the-size"),
    pytest.param(b"+5\r\nhello\r\n0\r\n\r\n", id="signed-size"),
])
def test_malformed_chunked_framing_is_answered_at_once(env: Env, body: bytes) -> None:
    user = env.user()
    marker = f"/chunk-{user}"
    head = (f"POST {marker} HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
            f"X-User-Context: {env.stack.context(user)}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    started = time.monotonic()
    answer = _raw_request(env, head + body, timeout=20)
    status, headers, problem = _status(answer)
    assert (status, headers.get("x-credproxy-error")) == (400, "malformed-request"), answer
    assert json.loads(problem)["reason"] in ("bad_framing", "client_protocol_error")
    assert time.monotonic() - started < 15  # answered, not left hanging
    assert not env.raw.saw(marker) or all(not q.body for q in env.raw.requests
                                          if marker in q.line)


def _h2_request(env: Env, authority: str, headers: list[tuple[bytes, bytes]], body: bytes,
                trailers: list[tuple[bytes, bytes]] | None,
                method: bytes = b"POST") -> dict[bytes, bytes]:
    import h2.config
    import h2.connection
    import h2.events

    host, _, port = env.stack.proxy_url.removeprefix("http://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    with sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(4096)
        ctx = ssl.create_default_context(cafile=str(env.stack.mitm_ca))
        ctx.set_alpn_protocols(["h2"])
        with ctx.wrap_socket(sock, server_hostname=authority.rsplit(":", 1)[0]) as tls:
            # Validation off: the test sends what a well-behaved client library would not.
            c = h2.connection.H2Connection(h2.config.H2Configuration(
                client_side=True, header_encoding=None, validate_outbound_headers=False,
                normalize_outbound_headers=False))
            c.initiate_connection()
            c.send_headers(1, [(b":method", method), (b":scheme", b"https"),
                               (b":authority", authority.encode()), *headers])
            c.send_data(1, body, end_stream=trailers is None)
            if trailers is not None:
                c.send_headers(1, trailers, end_stream=True)
            tls.sendall(c.data_to_send())
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                data = tls.recv(65536)
                if not data:
                    break
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        return dict(ev.headers)
                    if isinstance(ev, h2.events.StreamReset):
                        return {b":status": b"reset"}
                tls.sendall(c.data_to_send())
    raise AssertionError("no answer from the proxy")


def test_an_http2_request_trailer_section_is_refused_at_once(env: Env) -> None:
    user = env.user()
    marker = f"/h2trail-{user}"
    got = _h2_request(env, env.raw_authority,
                      [(b":path", marker.encode()),
                       (b"x-user-context", env.stack.context(user).encode())],
                      b"hello", [(b"x-checksum", b"abc"), (b"authorization", b"Bearer t")])
    assert (got[b":status"], got.get(b"x-credproxy-error")) == (b"400", b"malformed-request")
    assert not env.raw.saw(marker)


# unrouted: tunnel with an IPv6 provider: the intercept list once matched nothing for it, and
# then only its canonical spelling.
@pytest.mark.parametrize("spelling", ["[::1]", "[0:0:0:0:0:0:0:1]", "[0::1]", "[::0001]"])
def test_tunnel_mode_intercepts_every_spelling_of_an_ipv6_provider(
        env: Env, tmp_path: Path, spelling: str) -> None:
    cert, key = make_leaf(env.stack.ca, ["::1"], tmp_path, "v6")
    v6 = RawUpstream(cert, key, host="::1")
    port, admin = free_port(), free_port()
    cfg = {**env.stack.config, "listen": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{admin}",
           "unrouted": "tunnel"}
    docs = cfg["providers"][0]
    cfg["providers"] = [*cfg["providers"], {**docs, "id": "v6", "hosts": [f"[::1]:{v6.port}"]}]
    path = tmp_path / "tunnel.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = start_server(["-m", "proxy.cli", "run", "--config", str(path)],
                        ready=tcp_check("127.0.0.1", port), env=env.stack.env,
                        name="tunnel-v6b", log_dir=tmp_path / "logs")
    try:
        user = f"v6-{spelling}"
        env.stack.vault_put(user, env.stack.grant(user), provider="v6")
        authority = f"{spelling}:{v6.port}"
        r = rawhttp.request(f"http://127.0.0.1:{port}", connect=authority,
                            host_header=f"[::1]:{v6.port}", path="/v6",
                            headers={"X-User-Context": env.stack.context(user)},
                            ca_file=str(env.stack.mitm_ca), sni="::1")
        assert r.status == 200, r.body
        assert any(k == "Authorization" and v.startswith("Bearer at_")
                   for k, v in r.json()["headers"])
        assert not any(k.lower() == "x-user-context" for k, _ in r.json()["headers"])
    finally:
        proc.close()
        v6.close()


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_http1_response_trailers_are_dropped_for_every_agent_protocol(env: Env,
                                                                      http: str) -> None:
    user = env.user()
    out = subprocess.run(
        ["curl", "-sS", http, "-x", env.stack.proxy_url, "--cacert", str(env.stack.mitm_ca),
         "-H", f"X-User-Context: {env.stack.context(user)}", "-D", "-",
         f"https://{env.raw_authority}/t-{user}/trailers"],
        capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    _connect, _, rest = out.stdout.partition(b"\r\n\r\n")
    head, _, body = rest.partition(b"\r\n\r\n")
    assert b" 200" in head.split(b"\r\n")[0], out.stdout
    assert body.startswith(b"hello") and b"x-checksum" not in out.stdout.lower()


@pytest.mark.parametrize("upgrade", ["foo", "websocket, foo", "h2c", None])
@pytest.mark.parametrize("routed", [True, False])
def test_only_websocket_upgrades_and_no_raw_relay_after_a_101(env: Env, upgrade: str | None,
                                                              routed: bool) -> None:
    """An upstream that answered 101 to ``Upgrade: foo`` turned the connection into a raw
    relay: a second user's context and the agent's own Authorization went through
    undecided. Now no Upgrade but WebSocket is forwarded, and a 101 to anything else is a
    502 problem: the connection stays HTTP, so the next request is decided."""
    alice, bob = env.user(), env.user()
    authority = env.raw_authority if routed else f"127.0.0.1:{env.raw.port}"
    first = (f"GET /u-{alice}/switch HTTP/1.1\r\nHost: {authority}\r\n"
             f"X-User-Context: {env.stack.context(alice)}\r\n"
             + (f"Upgrade: {upgrade}\r\nConnection: Upgrade\r\n" if upgrade else "")
             + "\r\n")
    second = (f"GET /after-{bob} HTTP/1.1\r\nHost: {authority}\r\n"
              f"X-User-Context: {env.stack.context(bob)}\r\n"
              "Authorization: Bearer agent-own\r\nConnection: close\r\n\r\n")
    answer = _raw_request(env, (first + second).encode(), authority=authority)
    status, headers, body = _status(answer)
    assert (status, headers.get("x-credproxy-error")) == (502, "upstream-unreachable"), answer
    switched = next(q for q in env.raw.requests if f"/u-{alice}/" in q.line)
    assert not switched.header("Upgrade")  # never forwarded
    for q in env.raw.requests:
        assert "x-user-context" not in json.dumps(q.headers).lower()
    after = [q for q in env.raw.requests if f"/after-{bob}" in q.line]
    if after:  # decided like any request: bob's own token, never the agent's
        assert after[0].header("Authorization") == (
            [f"Bearer {env.token(bob)}"] if routed else ["Bearer agent-own"])


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_interim_responses_never_stand_in_for_the_final_one(env: Env, http: str) -> None:
    user = env.user()
    out = subprocess.run(
        ["curl", "-sS", http, "-x", env.stack.proxy_url, "--cacert", str(env.stack.mitm_ca),
         "-H", f"X-User-Context: {env.stack.context(user)}", "-w", "\n%{http_code}",
         f"https://{env.raw_authority}/i-{user}/early"],
        capture_output=True, timeout=30, check=True)
    assert out.stdout == b"final\n200"


@pytest.mark.parametrize(("expect", "status"), [
    ("100-continue, foo", 417), ("foo", 417), ("100-continue;x=1", 417),
    ("100-Continue", 200), (" 100-continue ", 200),
])
def test_only_the_100_continue_expectation_is_accepted(env: Env, expect: str,
                                                       status: int) -> None:
    user = env.user()
    marker = f"/expect-{user}"
    head = (f"POST {marker} HTTP/1.1\r\nHost: {env.raw_authority}\r\n"
            f"X-User-Context: {env.stack.context(user)}\r\nExpect: {expect}\r\n"
            "Content-Length: 5\r\nConnection: close\r\n\r\nhello").encode()
    answer = _raw_request(env, head)
    if answer.startswith(b"HTTP/1.1 100"):
        answer = answer.partition(b"\r\n\r\n")[2]
    got, headers, _ = _status(answer)
    assert got == status, answer
    if status == 417:
        assert headers["x-credproxy-error"] == "expectation-failed"
        assert not env.raw.saw(marker)


@pytest.mark.parametrize(("method", "path", "reason"), [
    pytest.param(b"GET", b"/x https://other-tenant.example/y", "bad_target", id="space-in-path"),
    pytest.param(b"GET", b"/x\x01y", "bad_target", id="control-in-path"),
    pytest.param(b"GET", b"/x\ty", "bad_target", id="tab-in-path"),
    pytest.param(b"GET", b"/x#frag", "bad_target", id="fragment"),
    pytest.param(b"GET /evil HTTP/1.1", b"/x", "bad_method", id="request-line-in-method"),
    pytest.param(b"G\x7fET", b"/x", "bad_method", id="control-in-method"),
])
@pytest.mark.parametrize("with_context", [True, False])
def test_http2_pseudo_headers_never_become_another_request_line(
        env: Env, method: bytes, path: bytes, reason: str, with_context: bool) -> None:
    """An HTTP/2 request is sent to an HTTP/1 provider as a request line built from
    :method and :path: a space or control byte in either made another request line."""
    user = env.user()
    before = len(env.raw.requests)
    headers = [(b":path", path)]
    if with_context:
        headers.append((b"x-user-context", env.stack.context(user).encode()))
    got = _h2_request(env, env.raw_authority, headers, b"", None, method=method)
    # Refused before any decision, with or without a user context, as a problem.
    assert (got[b":status"], got.get(b"x-credproxy-error")) == (b"400", b"malformed-request")
    assert len(env.raw.requests) == before


def test_a_refused_http2_request_with_trailers_is_still_answered(env: Env) -> None:
    """Refused (no user context) before its body: the body and its trailer section are
    discarded (they once stalled the exchange, so the agent never got an answer and the
    flow stayed in flight through a shutdown)."""
    got = _h2_request(env, env.raw_authority, [(b":path", b"/refused-trailers")], b"hello",
                      [(b"x-checksum", b"abc")])
    assert (got[b":status"], got.get(b"x-credproxy-error")) == (b"407",
                                                                 b"user-context-missing")


@pytest.mark.parametrize("spelling", ["0.0.0.0", "0", "[::]"])
@pytest.mark.parametrize("mode", ["passthrough", "tunnel"])
def test_the_unspecified_address_is_no_destination(env: Env, tmp_path: Path, spelling: str,
                                                   mode: str) -> None:
    """Linux connects 0.0.0.0 to loopback: in tunnel mode a loopback provider once got the
    agent's Authorization and user context this way, tunnelled with no decision."""
    proxy_url = env.stack.proxy_url
    proc = None
    if mode == "tunnel":
        port, admin = free_port(), free_port()
        cfg = {**env.stack.config, "listen": f"127.0.0.1:{port}",
               "admin": f"127.0.0.1:{admin}", "unrouted": "tunnel"}
        path = tmp_path / "tunnel.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = start_server(["-m", "proxy.cli", "run", "--config", str(path)],
                            ready=tcp_check("127.0.0.1", port), env=env.stack.env,
                            name="tunnel-zero", log_dir=tmp_path / "logs")
        proxy_url = f"http://127.0.0.1:{port}"
    try:
        user = env.user()
        marker = f"/zero-{user}"
        authority = f"{spelling}:{env.raw.port}"
        r = rawhttp.request(proxy_url, connect=authority, host_header=authority, path=marker,
                            headers={"X-User-Context": env.stack.context(user),
                                     "Authorization": "Bearer agent-own"},
                            ca_file=str(env.stack.mitm_ca), sni="localhost")
        assert r.status == 421 and r.problem == "misdirected-request", r.body
        assert not env.raw.saw(marker)
    finally:
        if proc is not None:
            proc.close()
