"""OAuth token sets (proxy.tokenset): parsing token responses, merging refreshes, redaction."""

from __future__ import annotations

import pickle
from dataclasses import replace
from typing import Any

import pytest

from proxy.secret import Secret
from proxy.tokenset import TokenSet, TokenSetError

NOW = 1_800_000_000.0
ACCESS = "at-0123456789-secret"
REFRESH = "rt-9876543210-secret"


def response(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"access_token": ACCESS, "token_type": "Bearer",
                            "refresh_token": REFRESH}
    for key, value in overrides.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


@pytest.mark.parametrize(("data", "expected"), [
    pytest.param(response(expires_in=3600), {"expires_at": NOW + 3600}, id="expires-in"),
    pytest.param(response(expires_in="3600"), {"expires_at": NOW + 3600},
                 id="expires-in-string"),
    pytest.param(response(expires_in=0), {"expires_at": NOW}, id="expires-in-zero"),
    pytest.param(response(expires_in=1.5), {"expires_at": NOW + 1.5}, id="expires-in-float"),
    pytest.param(response(expires_at=NOW + 60), {"expires_at": NOW + 60}, id="expires-at"),
    pytest.param(response(expires_at=NOW + 60, expires_in=3600), {"expires_at": NOW + 60},
                 id="expires-at-wins"),
    pytest.param(response(expires_in=None), {"expires_at": None}, id="expires-in-null"),
    pytest.param(response(), {"expires_at": None}, id="neither"),
    pytest.param(response(token_type=...), {"token_type": "Bearer"}, id="token-type-default"),
    pytest.param(response(token_type="mac"), {"token_type": "mac"}, id="token-type-kept"),
    pytest.param(response(scope="read write"), {"scope": "read write"}, id="scope-string"),
    pytest.param(response(scope=["read", "write"]), {"scope": "read write"}, id="scope-list"),
    pytest.param(response(scope=None), {"scope": None}, id="scope-null"),
    pytest.param(response(refresh_token=...), {"refresh_token": None}, id="no-refresh-token"),
    pytest.param(response(refresh_token=None), {"refresh_token": None},
                 id="refresh-token-null"),
    pytest.param(response(id_token="x", extra={"a": 1}), {}, id="extra-members-ignored"),
])
def test_from_response(data: dict[str, Any], expected: dict[str, Any]) -> None:
    tokens = TokenSet.from_response(data, now=NOW)
    assert tokens.access_token == Secret(ACCESS)
    values = {"refresh_token": Secret(REFRESH), "token_type": "Bearer", "expires_at": None,
              "scope": None, **expected}
    for name, value in values.items():
        assert getattr(tokens, name) == value, name


@pytest.mark.parametrize(("data", "match"), [
    pytest.param(response(access_token=...), "no access_token", id="missing-access-token"),
    pytest.param(response(access_token=""), "no access_token", id="empty-access-token"),
    pytest.param(response(access_token=42), "no access_token", id="access-token-int"),
    pytest.param(response(access_token=None), "no access_token", id="access-token-null"),
    pytest.param(response(refresh_token=""), "refresh_token must be", id="refresh-token-empty"),
    pytest.param(response(refresh_token=["x"]), "refresh_token must be",
                 id="refresh-token-list"),
    pytest.param(response(token_type=""), "token_type must be", id="token-type-empty"),
    pytest.param(response(token_type=1), "token_type must be", id="token-type-int"),
    pytest.param(response(expires_in=-1), "expires_in must be a non-negative", id="negative"),
    pytest.param(response(expires_in=float("nan")), "expires_in must be a non-negative",
                 id="nan"),
    pytest.param(response(expires_in="NaN"), "expires_in must be a non-negative",
                 id="nan-string"),
    pytest.param(response(expires_in=float("inf")), "expires_in must be a non-negative",
                 id="infinite"),
    pytest.param(response(expires_in="1e999"), "expires_in must be a non-negative",
                 id="overflowing-string"),
    pytest.param(response(expires_in="soon"), "expires_in must be a number", id="word"),
    pytest.param(response(expires_in=True), "expires_in must be a number", id="bool"),
    pytest.param(response(expires_in=[60]), "expires_in must be a number", id="list"),
    pytest.param(response(expires_at=-5), "expires_at must be a non-negative",
                 id="expires-at-negative"),
    pytest.param(response(expires_at="later"), "expires_at must be a number",
                 id="expires-at-word"),
    pytest.param(response(scope=42), "scope must be a string", id="scope-int"),
    pytest.param(response(scope=["read", 1]), "scope must be a string", id="scope-mixed-list"),
    pytest.param(["access_token"], "must be a JSON object", id="not-a-mapping"),
    pytest.param(
        response(expires_in=10**400), "expires_in must be a number", id="huge-integer"),
])
def test_from_response_rejects(data: Any, match: str) -> None:
    with pytest.raises(TokenSetError, match=match) as info:
        TokenSet.from_response(data, now=NOW)
    assert ACCESS not in str(info.value) and REFRESH not in str(info.value)


@pytest.mark.parametrize(("previous_refresh", "new_refresh", "expected"), [
    pytest.param("rt-old", None, "rt-old", id="keeps-old-when-omitted"),
    pytest.param("rt-old", "rt-new", "rt-new", id="rotated-token-wins"),
    pytest.param(None, None, None, id="neither"),
    pytest.param(None, "rt-new", "rt-new", id="new-only"),
])
def test_merged_refresh(previous_refresh: str | None, new_refresh: str | None,
                        expected: str | None) -> None:
    previous = TokenSet(Secret("at-old"),
                        Secret(previous_refresh) if previous_refresh else None)
    fresh = TokenSet(Secret("at-new"), Secret(new_refresh) if new_refresh else None,
                     expires_at=NOW + 60, scope="read")
    merged = fresh.merged_refresh(previous)
    assert merged.access_token == Secret("at-new")
    assert (merged.refresh_token.reveal() if merged.refresh_token else None) == expected
    assert (merged.expires_at, merged.scope) == (NOW + 60, "read")


@pytest.mark.parametrize(("expires_at", "within", "expected"), [
    pytest.param(None, 60, False, id="unknown-expiry"),
    pytest.param(NOW + 61, 60, False, id="outside"),
    pytest.param(NOW + 60, 60, True, id="boundary"),
    pytest.param(NOW + 10, 60, True, id="inside"),
    pytest.param(NOW - 10, 0, True, id="already-expired"),
])
def test_expires_within(expires_at: float | None, within: float, expected: bool) -> None:
    assert TokenSet(Secret("at"), expires_at=expires_at).expires_within(within, now=NOW) is (
        expected)


@pytest.mark.parametrize(("issued_in", "expires_in", "skew", "margin"), [
    pytest.param(None, 3600, 60, 60, id="unknown-lifetime-skew"),
    pytest.param(0, 3600, 60, 60, id="long-lifetime-skew"),
    pytest.param(0, 30, 60, 15, id="short-lifetime-half"),
    pytest.param(0, 120, 60, 60, id="boundary-equal"),
    pytest.param(0, 0, 60, 0, id="zero-lifetime"),
])
def test_refresh_margin_is_capped_by_half_the_lifetime(issued_in: float | None,
                                                       expires_in: float, skew: float,
                                                       margin: float) -> None:
    """Issue 13 fault 4: 30 s tokens with refresh_skew 60 were refreshed on every request;
    the margin is min(skew, lifetime / 2), so one refresh per lifetime."""
    tokens = TokenSet(Secret("at"), expires_at=NOW + expires_in,
                      issued_at=None if issued_in is None else NOW + issued_in)
    assert tokens.refresh_margin(skew) == margin


def test_thirty_second_tokens_refresh_once_per_lifetime() -> None:
    """Five requests spread over one 30 s lifetime need exactly one refresh (skew 60)."""
    tokens = TokenSet(Secret("at"), expires_at=NOW + 30, issued_at=NOW)
    due = [tokens.needs_refresh(60, now=NOW + t) for t in (0, 5, 10, 14, 16)]
    assert due == [False, False, False, False, True]
    assert not TokenSet(Secret("at"), expires_at=None, issued_at=NOW).needs_refresh(60, now=NOW)


def test_record_round_trip() -> None:
    tokens = TokenSet.from_response(response(expires_in=3600, scope=["a", "b"]), now=NOW)
    record = tokens.to_record()
    assert record == {"access_token": ACCESS, "refresh_token": REFRESH, "token_type": "Bearer",
                      "expires_at": NOW + 3600, "scope": "a b", "issued_at": None}
    assert TokenSet.from_record(record) == tokens
    received = replace(tokens, issued_at=NOW)  # as read from a token endpoint
    assert TokenSet.from_record(received.to_record()) == received
    # A record stored before issued_at was kept reads as an unknown lifetime.
    old = {k: v for k, v in received.to_record().items() if k != "issued_at"}
    assert TokenSet.from_record(old).issued_at is None
    bare = TokenSet(Secret("at"))
    assert TokenSet.from_record(bare.to_record()) == bare


@pytest.mark.parametrize("render", [repr, str, lambda t: f"{t}", lambda t: f"{t!r}",
                                    lambda t: "%s %r" % (t, t),  # noqa: UP031
                                    lambda t: str([t])],
                         ids=["repr", "str", "fstring", "fstring-r", "percent", "in-list"])
def test_tokens_never_print(render: Any) -> None:
    tokens = TokenSet.from_response(response(expires_in=60), now=NOW)
    text = render(tokens)
    assert ACCESS not in text and REFRESH not in text
    assert "<redacted>" in text


def test_tokenset_cannot_be_pickled() -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(TokenSet.from_response(response(), now=NOW))
