"""The one registry of reason codes (proxy.reasons): every reason the code base writes is
registered, spelled once, in snake_case (but for the request-syntax codes not yet
renamed), and metrics label only registered codes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy import reasons
from proxy.metrics import reason_label

ROOT = Path(__file__).resolve().parents[2]
# reason="..." keyword literals, connect rejections, re-auth reasons and grant marks.
_LITERALS = [
    re.compile(r"""\breason=["']([^"'{}]+)["']"""),
    re.compile(r"""ConnectRejected\(\s*["']([^"'{}]+)["']"""),
    re.compile(r"""\.reauth\(\s*provider,\s*["']([^"'{}]+)["']"""),
    re.compile(r"""_mark\([^)]*?,\s*["']([^"'{}]+)["']\)"""),
    re.compile(r"""mark_reauth\([^)]*?,\s*["']([^"'{}]+)["']\)"""),
]


def _reasons_in_source() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted([*ROOT.joinpath("proxy").rglob("*.py"),
                        *ROOT.joinpath("addons").rglob("*.py")]):
        text = path.read_text(encoding="utf-8")
        for pattern in _LITERALS:
            for code in pattern.findall(text):
                found.setdefault(code, []).append(str(path.relative_to(ROOT)))
    return found


def test_the_source_is_scanned() -> None:
    found = _reasons_in_source()
    assert {"revoked_upstream", "unknown_kid", "no_user_token", "bad_framing"} <= set(found)


def test_every_reason_in_the_code_is_registered() -> None:
    """A reason written anywhere in proxy/ or addons/ must be in the registry: one list,
    so the metrics allowlist cannot drift from the codes in use again."""
    unknown = {code: where for code, where in _reasons_in_source().items()
               if not reasons.known(code)}
    assert unknown == {}


def test_codes_are_snake_case_but_for_the_named_legacy_ones() -> None:
    kebab = {code for code in reasons.REGISTRY if not reasons.is_snake(code)}
    assert kebab == set(reasons.LEGACY_KEBAB)
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)+", code) for code in kebab)
    identity = [c for c, r in reasons.REGISTRY.items() if reasons.IDENTITY in r.events]
    assert identity and all(reasons.is_snake(c) for c in identity)


def test_every_code_says_where_it_appears_and_what_it_means() -> None:
    for code, reason in reasons.REGISTRY.items():
        assert reason.code == code and reason.events and len(reason.meaning) > 10, code


@pytest.mark.parametrize(("reason", "label"), [
    pytest.param("invalid_grant", "invalid_grant", id="registered"),
    pytest.param("lookalike_header", "lookalike_header", id="identity-snake"),
    pytest.param("lookalike-header", "other", id="old-kebab-spelling-gone"),
    pytest.param("token_exchange_failed:invalid_grant", "token_exchange_failed", id="family"),
    pytest.param("provider_error:<script>", "provider_error", id="family-free-text"),
    pytest.param("scope=read", "other", id="free-text"),
    pytest.param("attacker-chosen", "other", id="unregistered"),
    pytest.param(None, "other", id="none"),
])
def test_metric_labels_come_from_the_registry(reason: str | None, label: str) -> None:
    assert reason_label(reason) == label


@pytest.mark.parametrize(("code", "reason"), [
    ("invalid_grant", "invalid_grant"), ("BAD_REFRESH_TOKEN", "bad_refresh_token"),
    ("invalid-grant", "invalid_grant"), ("  Token Revoked ", "token_revoked"),
    ("401", "code_401"), ("!!!", "token_endpoint_error"), ("x" * 100, "x" * 64),
])
def test_provider_codes_become_snake_case_reasons(code: str, reason: str) -> None:
    assert reasons.from_provider_code(code) == reason
