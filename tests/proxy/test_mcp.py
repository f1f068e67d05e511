"""proxy.mcp: which requests are MCP, what they call, and refusals as JSON-RPC errors."""

from __future__ import annotations

import json

from mcp import UrlElicitationRequiredError
from mcp_types import URL_ELICITATION_REQUIRED, ErrorData

from proxy import mcp
from proxy.errors import InsufficientScope, ReauthRequired, UserContextMissing

SSE = [(b"Accept", b"application/json, text/event-stream"),
       (b"Content-Type", b"application/json")]


def _body(method: str, params: object = None, rid: object = 7) -> bytes:
    msg: dict[str, object] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    if rid is not None:
        msg["id"] = rid
    return json.dumps(msg).encode()


def test_may_be_mcp_only_small_uncompressed_json_posts() -> None:
    small = [(b"content-type", b"application/json; charset=utf-8"),
             (b"content-length", b"120")]
    assert mcp.may_be_mcp("POST", small)
    assert not mcp.may_be_mcp("GET", small)
    assert mcp.may_be_mcp("POST", [*small[:1], (b"content-length", b"70000")])
    assert mcp.may_be_mcp("POST", [*small[:1], (b"content-length", b"1048576")])
    assert not mcp.may_be_mcp("POST", [*small[:1], (b"content-length", b"1048577")])
    assert not mcp.may_be_mcp("POST", small[:1])  # no length: a stream
    assert not mcp.may_be_mcp("POST", [*small, (b"content-encoding", b"gzip")])
    assert not mcp.may_be_mcp("POST", [(b"content-type", b"text/plain"), small[1]])


def test_read_call_names_tools_resources_prompts_never_arguments() -> None:
    call = mcp.read_call(SSE, _body("tools/call", {"name": "lookup",
                                                   "arguments": {"q": "secret"}}))
    assert call == mcp.McpCall("tools/call", "lookup", (7,), None)
    assert "secret" not in repr(call)
    assert mcp.read_call(SSE, _body("resources/read", {"uri": "file:///a?who=alice#x"})) == \
        mcp.McpCall("resources/read", "file:///a", (7,))
    assert mcp.read_call(SSE, _body("prompts/get", {"name": "p"}, rid="x")) == \
        mcp.McpCall("prompts/get", "p", ("x",))
    init = mcp.read_call(SSE, _body("initialize", {"protocolVersion": "2025-11-25"}))
    assert init is not None and init.version == "2025-11-25" and init.name is None


def test_the_body_names_the_call_and_a_plain_json_api_is_not_mcp() -> None:
    headers = [*SSE, (b"MCP-Protocol-Version", b"2026-07-28"), (b"Mcp-Method", b"tools/call"),
               (b"Mcp-Name", b"from-header")]
    call = mcp.read_call(headers, _body("tools/call", {"name": "from-body"}))
    # The body names what runs; the disagreeing Mcp-Name is a conflict (refused).
    assert call is not None and (call.method, call.name, call.ids) == (
        "tools/call", "from-body", (7,))
    assert call.conflict is not None and "from-header" in call.conflict
    # Headers alone (the body was not read): named, no id.
    assert mcp.read_call(headers, None) == mcp.McpCall("tools/call", "from-header", (),
                                                       "2026-07-28")
    uri = [*SSE, (b"Mcp-Method", b"resources/read"), (b"Mcp-Name", b"db://t?user=bob")]
    assert mcp.read_call(uri, None) == mcp.McpCall("resources/read", "db://t")
    plain = [(b"Accept", b"application/json"), (b"Content-Type", b"application/json")]
    assert mcp.read_call(plain, _body("tools/call", {"name": "x"})) is None
    assert mcp.read_call(SSE, b'{"not": "json-rpc"}') is None
    assert mcp.read_call(SSE, b"not json") is None


def test_reauth_at_2025_11_25_is_a_url_elicitation_the_sdk_reads() -> None:
    refusal = ReauthRequired("connect again", provider="linear", reason="invalid_grant",
                             connect_url="https://proxy.example/connect/linear")
    call = mcp.McpCall("tools/call", "x", (3,), "2025-11-25")
    answer = mcp.refusal_answer(refusal, call)
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/json"
    body = json.loads(answer.body)
    assert body["id"] == 3 and body["error"]["code"] == URL_ELICITATION_REQUIRED
    data = body["error"]["data"]
    assert (data["slug"], data["reason"], data["provider"]) == (
        "reauth-required", "invalid_grant", "linear")
    err = UrlElicitationRequiredError.from_error(ErrorData.model_validate(body["error"]))
    assert [e.url for e in err.elicitations] == ["https://proxy.example/connect/linear"]


def test_other_versions_and_other_refusals_get_credproxy_codes() -> None:
    scope = InsufficientScope("needs write", provider="gh", scope="read write",
                              connect_url="https://p/connect/gh?scope=read+write")
    body = json.loads(mcp.refusal_answer(
        scope, mcp.McpCall("tools/call", "x", (1,), "2026-07-28")).body)
    assert body["error"]["code"] == mcp.CONSENT_REQUIRED
    assert body["error"]["data"]["scope"] == "read write"
    assert "elicitations" not in body["error"]["data"]
    missing = json.loads(mcp.refusal_answer(
        UserContextMissing("no context"), mcp.McpCall("tools/list", None, (2,))).body)
    assert missing["error"]["code"] == mcp.REFUSED
    assert missing["error"]["data"]["slug"] == "user-context-missing"


def test_notifications_and_batches() -> None:
    refusal = ReauthRequired("connect again", provider="p", reason="expired",
                             connect_url="https://c")
    note = mcp.read_call(SSE, _body("notifications/initialized", rid=None))
    assert note is not None and note.ids == ()
    answer = mcp.refusal_answer(refusal, note)
    assert answer.status == 403 and "WWW-Authenticate" not in answer.headers
    assert json.loads(answer.body)["id"] is None
    batch = b"[" + _body("tools/list", rid=1) + b"," + _body("x/y", rid=None) + b"," + \
        _body("tools/list", rid=2) + b"]"
    call = mcp.read_call(SSE, batch)
    assert call is not None and call.batch and call.ids == (1, 2)
    answers = json.loads(mcp.refusal_answer(refusal, call).body)
    assert [a["id"] for a in answers] == [1, 2]
