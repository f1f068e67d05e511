"""A reload is applied all at once (issue 14, item 5), through a real `credproxy run`.

Two configurations differ in everything a request reads: a provider's hosts, its inject
header and format, and the user-context header. Requests stream to both hosts while the
running proxy is switched between the two many times (SIGHUP, `reload.settle: 0`); each
request that reaches an upstream must show exactly one of the two configurations, never the
new route with the old inject format, or the new context header read with the old one
stripped.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from devstack.stack import Stack, build_stack
from proxy.app import settings_digest
from proxy.settings import load_settings

pytestmark = pytest.mark.integration

USER = "atomic"
SWITCHES = 12  # reloads, alternating between the two configurations


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = build_stack(tmp_path, config={"reload": {"settle": 0}})
    yield s
    s.close()


def _configs(s: Stack, a_port: str, b_port: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Config A: provider echo on host A, ``X-Api-Key: A <token>``, context in
    X-User-Context. Config B: echo on hosts A and B, ``X-Other-Key: B <token>``, context in
    X-Agent-Context. Each allows removing echo's host B (going back from B to A)."""
    cfg = yaml.safe_load(s.config_path.read_text())
    docs = next(p for p in cfg["providers"] if p["id"] == "docs")
    reload = {"settle": 0, "allow_provider_removal": ["echo"]}

    def config(header: str, hosts: list[str], inject: dict[str, str]) -> dict[str, Any]:
        echo = {**docs, "id": "echo", "hosts": hosts, "inject": inject}
        return {**cfg, "identity": {**cfg["identity"], "header": header},
                "providers": [*cfg["providers"], echo], "reload": reload}

    a = config("X-User-Context", [f"localhost:{a_port}"],
               {"header": "X-Api-Key", "format": "A {access_token}"})
    b = config("X-Agent-Context", [f"localhost:{a_port}", f"localhost:{b_port}"],
               {"header": "X-Other-Key", "format": "B {access_token}"})
    return a, b


def _digest(s: Stack) -> str:
    text = httpx2.get(f"http://{s.config['admin']}/metrics", trust_env=False).text
    return next(line.split('digest="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("credproxy_config_info{"))


def _apply(s: Stack, cfg: dict[str, Any], timeout: float = 20.0) -> None:
    """Write ``cfg`` atomically, SIGHUP, and wait until the proxy runs it."""
    tmp = s.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, s.config_path)
    want = settings_digest(load_settings(s.config_path))
    assert s.proxy is not None
    s.proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while _digest(s) != want:
        assert time.monotonic() < deadline, "the reload was not applied"
        time.sleep(0.02)


def _which(host: str, status: int, headers: dict[str, str] | None) -> str:
    """Which configuration a response shows: "A", "B", or a description of the mix."""
    if status == 403 and host == "B":
        return "A"  # host B was echo's in B and is refused (provider_removed) in A
    if status != 200 or headers is None:
        return f"status {status}"
    api, other = headers.get("x-api-key"), headers.get("x-other-key")
    user, agent = "x-user-context" in headers, "x-agent-context" in headers
    if host == "A" and (api or "").startswith("A at_") and other is None and agent \
            and not user:
        return "A"
    if host == "B" and api is None and other is None and agent and not user:
        return "A"  # host B unrouted: passed through, the identity header stripped
    if (other or "").startswith("B at_") and api is None and user and not agent:
        return "B"
    return f"mixed: {sorted(headers.items())}"


def test_every_request_sees_one_configuration_while_reloads_swap_it(stack: Stack) -> None:
    s = stack
    echo_a = s.echo_server(tls=True, name="echo-a")
    echo_b = s.echo_server(tls=True, name="echo-b")
    a_port, b_port = echo_a.url.rsplit(":", 1)[1], echo_b.url.rsplit(":", 1)[1]
    s.vault_put(USER, s.grant(USER), provider="echo")
    config_a, config_b = _configs(s, a_port, b_port)
    _apply(s, config_a)
    context = s.context(USER)
    seen: list[tuple[str, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def agent(host: str, port: str) -> None:
        url = f"https://localhost:{port}/echo"
        # The context under both names: the running config decides which one is read.
        with httpx2.Client(proxy=s.proxy_url, verify=s.mitm_tls(), timeout=30,
                           trust_env=False, headers={"X-User-Context": context,
                                                     "X-Agent-Context": context}) as c:
            while not stop.is_set():
                try:
                    r = c.get(url)
                except httpx2.HTTPError as exc:
                    errors.append(f"{host}: {type(exc).__name__}: {exc}")
                    continue
                headers = ({k.lower(): v for k, v in r.json()["headers"]}
                           if r.status_code == 200 else None)
                seen.append((host, _which(host, r.status_code, headers)))

    agents = [threading.Thread(target=agent, args=(host, port), daemon=True)
              for host, port in (("A", a_port), ("B", b_port), ("A", a_port), ("B", b_port))]
    for t in agents:
        t.start()
    try:
        for i in range(SWITCHES):
            time.sleep(0.15)
            _apply(s, config_b if i % 2 == 0 else config_a)
        time.sleep(0.15)
    finally:
        stop.set()
        for t in agents:
            t.join(30)
    assert not errors, errors[:5]
    wrong = [(host, what) for host, what in seen if what not in ("A", "B")]
    assert not wrong, wrong[:5]
    # Both configurations served both hosts while the reloads ran.
    assert {("A", "A"), ("A", "B"), ("B", "A"), ("B", "B")} <= set(seen), set(seen)
    assert len(seen) > 4 * SWITCHES
    # Every switch was an applied reload, none rejected.
    assert _reloads(s, "applied") >= SWITCHES + 1 and _reloads(s, "rejected") == 0


def _reloads(s: Stack, result: str) -> float:
    text = httpx2.get(f"http://{s.config['admin']}/metrics", trust_env=False).text
    for line in text.splitlines():
        if line.startswith("credproxy_config_reloads_total{") and f'result="{result}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
