"""The shipped example configuration stays valid."""

from __future__ import annotations

from pathlib import Path

from proxy.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_is_valid() -> None:
    s = load_settings(ROOT / "config" / "credproxy.example.yaml")
    assert [p.id for p in s.providers] == ["docs", "graph", "salesforce", "quickbooks"]
    assert s.identity.algorithms == ["EdDSA", "ES256", "RS256"]
