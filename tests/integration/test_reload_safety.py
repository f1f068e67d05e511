"""Hot reload never fails open (issue 19, item 3), through a real `credproxy run`.

A config file that is truncated, half-written, lists no providers or drops one is refused
(logged at ERROR, counted as `rejected`) and the running providers keep injecting; the
watcher does not read a file that is still being written; and once a provider is removed on
purpose its hosts are refused, never passed through with the agent's own Authorization.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration

USER = "reload-safety"
AGENT_AUTH = "Bearer shared-service-account-canary"


def _until(pred: Callable[[], object], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _metric(s: Stack, name: str, **labels: str) -> float:
    text = httpx2.get(f"http://{s.config['admin']}/metrics", trust_env=False).text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _reloads(s: Stack, result: str) -> float:
    return _metric(s, "credproxy_config_reloads_total", result=result)


def _stderr(s: Stack) -> str:
    assert s.proxy is not None
    return s.proxy.stderr_text()


def _docs_request(s: Stack, marker: str) -> httpx2.Response:
    """The agent calls the docs provider with its own shared-account Authorization."""
    with s.client(context=s.context(USER)) as c:
        return c.get(f"{s.docs_url}/echo/{marker}", headers={"Authorization": AGENT_AUTH})


def _upstream_auth(r: httpx2.Response) -> str | None:
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    return headers.get("authorization")


def _assert_docs_injects(s: Stack, marker: str) -> None:
    r = _docs_request(s, marker)
    assert r.status_code == 200, r.text
    auth = _upstream_auth(r) or ""
    assert auth.startswith("Bearer at_") and "canary" not in auth


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # settle 3 s: the two-part write below pauses 2 s, two polls (one per second) long.
    s = build_stack(tmp_path_factory.mktemp("reload-safety"), config={"reload": {"settle": 3}})
    s.vault_put(USER, s.grant(USER))
    s.info_original = s.config_path.read_bytes()  # type: ignore[attr-defined]
    yield s
    s.close()


def _original(s: Stack) -> bytes:
    data: bytes = s.info_original  # type: ignore[attr-defined]
    return data


def _without_docs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**cfg, "providers": [p for p in cfg["providers"] if p["id"] != "docs"]}


def _docs_host_dropped(cfg: dict[str, Any]) -> dict[str, Any]:
    docs = {**cfg["providers"][0], "hosts": cfg["providers"][0]["hosts"][1:]}
    return {**cfg, "providers": [docs, *cfg["providers"][1:]]}


# Each row is a config a reload must refuse; "why" is what the ERROR line says.
REFUSED = [
    pytest.param(lambda cfg: yaml.safe_dump({**cfg, "providers": []}, sort_keys=False),
                 "removes provider 'docs'; provider 'keyed'; provider 'wild' (0 providers left)",
                 id="providers-empty-list"),
    pytest.param(lambda cfg: yaml.safe_dump({k: v for k, v in cfg.items()
                                             if k != "providers"}, sort_keys=False),
                 "(0 providers left)", id="providers-key-missing"),
    pytest.param(lambda cfg: yaml.safe_dump(_without_docs(cfg), sort_keys=False),
                 "removes provider 'docs' (2 providers left)", id="one-provider-removed"),
    pytest.param(lambda cfg: yaml.safe_dump(_docs_host_dropped(cfg), sort_keys=False),
                 "of provider 'docs'", id="one-host-removed"),
    # A file cut off after the second provider's id: valid YAML, a valid config, with the
    # last providers missing (what a half-written file that stays that way looks like).
    pytest.param(lambda cfg: (lambda t: t[:t.index("- id: keyed")])(
        yaml.safe_dump(cfg, sort_keys=False)),
                 "removes provider 'keyed'; provider 'wild' (1 providers left)",
                 id="truncated-after-first-provider"),
]


@pytest.mark.parametrize("make,why", REFUSED)
def test_a_reload_that_removes_providers_is_refused(stack: Stack, make: Any, why: str,
                                                    marker: str) -> None:
    s = stack
    cfg = yaml.safe_load(_original(s))
    rejected = _reloads(s, "rejected")
    errors = _stderr(s).count(" ERROR credproxy.config: config reload rejected")
    try:
        s.config_path.write_text(make(cfg))
        assert _until(lambda: _reloads(s, "rejected") == rejected + 1)
        # Log lines are written by a thread: the metric may be ahead of the log.
        assert _until(lambda: _stderr(s).count(" ERROR credproxy.config: config reload "
                                               "rejected") == errors + 1)
        log = _stderr(s)
        assert log.count(" ERROR credproxy.config: config reload rejected") == errors + 1
        assert why in log
        assert "reload: {allow_provider_removal: [" in log
        # The running providers keep serving, with the user's own token.
        _assert_docs_injects(s, marker)
    finally:
        applied = _reloads(s, "applied")
        s.config_path.write_bytes(_original(s))
        # Going back to the running config is no removal: applied (or a no-op when the
        # refused file's digest is what the watcher saw last).
        _until(lambda: _reloads(s, "applied") > applied, timeout=15)


def _write_in_two_parts(path: Path, data: bytes, pause: float) -> None:
    """Write ``data`` in place like a slow editor: truncate, first half, pause, the rest."""
    half = len(data) // 2
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data[:half])
        f.flush()
        time.sleep(pause)
        f.write(data[half:])


def test_a_half_written_file_is_not_read_until_it_settles(stack: Stack, marker: str) -> None:
    s = stack
    cfg = yaml.safe_load(_original(s))
    cfg["refresh"] = {**cfg["refresh"], "attempts": 2}  # a live change, to see it applied
    new = yaml.safe_dump(cfg, sort_keys=False).encode()
    rejected, applied = _reloads(s, "rejected"), _reloads(s, "applied")
    waiting = _stderr(s).count("is still changing")
    # The half-written state lasts longer than a poll (1 s) but less than the settle
    # interval (reload.settle, 3 s): the watcher sees it, waits, sees it change, waits on.
    _write_in_two_parts(s.config_path, new, pause=2.0)
    assert _until(lambda: _reloads(s, "applied") == applied + 1)
    assert _until(lambda: _stderr(s).count("is still changing") > waiting)
    assert _reloads(s, "rejected") == rejected  # the half file was never parsed
    _assert_docs_injects(s, marker)
    s.config_path.write_bytes(_original(s))
    assert _until(lambda: _reloads(s, "applied") == applied + 2)


def test_a_half_written_file_left_longer_than_the_settle_time_is_refused(
        stack: Stack, marker: str) -> None:
    s = stack
    data = _original(s)
    rejected, applied = _reloads(s, "rejected"), _reloads(s, "applied")
    # Cut inside the providers list: the first half parses (or not) as fewer providers.
    cut = data.index(b"- id: keyed")
    with open(s.config_path, "r+b") as f:
        f.truncate(0)
        f.write(data[:cut])
        f.flush()
        assert _until(lambda: _reloads(s, "rejected") == rejected + 1)
        _assert_docs_injects(s, marker)  # meanwhile the old config serves
        f.write(data[cut:])
    # The finished file is the running config again: nothing to refuse.
    assert _until(lambda: _reloads(s, "applied") == applied + 1)
    assert _reloads(s, "rejected") == rejected + 1
    _assert_docs_injects(s, marker + "-after")


@pytest.mark.parametrize("unrouted", ["passthrough", "tunnel"])
def test_a_provider_removed_on_purpose_is_refused_not_passed_through(
        tmp_path: Path, unrouted: str, marker: str) -> None:
    s = build_stack(tmp_path, config={"unrouted": unrouted})
    try:
        s.vault_put(USER, s.grant(USER))
        _assert_docs_injects(s, marker + "-before")
        cfg = yaml.safe_load(s.config_path.read_text())
        removed = {**_without_docs(cfg), "reload": {"allow_provider_removal": ["docs"]}}
        s.config_path.write_text(yaml.safe_dump(removed, sort_keys=False))
        assert _until(lambda: _reloads(s, "applied") == 1)
        assert _until(lambda: "config reloaded (2 providers)" in _stderr(s))
        # The docs host is no provider now, but it was one: the agent's own Authorization
        # must not reach it. Refused, naming the provider; nothing went upstream.
        gone = marker + "-gone"
        r = _docs_request(s, gone)
        assert r.status_code == 403, r.text
        assert r.headers["X-Credproxy-Error"] == "unrouted-denied"
        body = r.json()
        assert body["reason"] == "provider_removed" and "'docs'" in body["detail"]
        assert not s.docs_saw(gone)
        assert _metric(s, "credproxy_denials_total", provider="-",
                       problem="unrouted-denied", reason="provider_removed") == 1
        if unrouted == "tunnel":
            # Still intercepted, not tunnelled: a client trusting only the upstream's own
            # CA cannot reach it end to end through the proxy.
            own = ssl.create_default_context(cafile=str(s.ca.cert_path))
            with pytest.raises(httpx2.ConnectError):
                with httpx2.Client(proxy=s.proxy_url, verify=own, trust_env=False) as c:
                    c.get(f"{s.docs_url}/echo/{gone}-tunnel",
                          headers={"Authorization": AGENT_AUTH})
            assert not s.docs_saw(gone)
        # Other unrouted hosts are untouched by this.
        if unrouted == "passthrough":
            echo = s.echo_server(tls=True)
            with s.client() as c:
                e = c.get(f"{echo.url.replace('127.0.0.1', 'localhost')}/echo")
            assert e.status_code == 200
        # Putting the provider back routes its host again.
        s.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        assert _until(lambda: _reloads(s, "applied") == 2)
        _assert_docs_injects(s, marker + "-restored")
    finally:
        s.close()
