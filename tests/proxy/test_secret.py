"""The Secret wrapper (proxy.secret): never printed, never pickled, compared in constant time."""

from __future__ import annotations

import copy
import json
import logging
import pickle
from typing import Any

import pytest

from proxy.secret import Secret

VALUE = "tok-ABCdef-0123456789"


@pytest.mark.parametrize("render", [
    pytest.param(repr, id="repr"),
    pytest.param(str, id="str"),
    pytest.param(lambda s: f"{s}", id="fstring"),
    pytest.param(lambda s: f"{s!r}", id="fstring-repr"),
    pytest.param(lambda s: f"{s!s}", id="fstring-str"),
    pytest.param(lambda s: f"{s:>40}", id="fstring-spec"),
    pytest.param(lambda s: format(s, "s"), id="format"),
    pytest.param(lambda s: "{}".format(s), id="str-format"),  # noqa: UP032
    pytest.param(lambda s: "%s %r" % (s, s), id="percent"),  # noqa: UP031
    pytest.param(lambda s: str([s, {"k": s}]), id="in-containers"),
    pytest.param(lambda s: str(ValueError(s)), id="exception-message"),
])
def test_renderings_are_redacted(render: Any) -> None:
    text = render(Secret(VALUE))
    assert VALUE not in text
    assert "<redacted>" in text


def test_str_and_repr_exact() -> None:
    assert str(Secret(VALUE)) == "<redacted>"
    assert repr(Secret(VALUE)) == "Secret(<redacted>)"


def test_logging_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("credproxy.test").info("token %s", Secret(VALUE))
    assert VALUE not in caplog.text and "<redacted>" in caplog.text


def test_reveal_returns_the_value() -> None:
    assert Secret(VALUE).reveal() == VALUE


@pytest.mark.parametrize("value", [b"bytes", 42, None], ids=["bytes", "int", "none"])
def test_only_str_is_wrapped(value: Any) -> None:
    with pytest.raises(TypeError, match="Secret wraps a str"):
        Secret(value)


@pytest.mark.parametrize("dump", [
    pytest.param(pickle.dumps, id="pickle"),
    pytest.param(lambda s: pickle.dumps(s, protocol=0), id="pickle-protocol-0"),
    pytest.param(lambda s: pickle.dumps([s]), id="pickle-nested"),
    pytest.param(copy.copy, id="copy"),
    pytest.param(copy.deepcopy, id="deepcopy"),
])
def test_pickling_is_refused(dump: Any) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        dump(Secret(VALUE))


def test_json_serialisation_is_refused() -> None:
    with pytest.raises(TypeError):
        json.dumps({"token": Secret(VALUE)})


@pytest.mark.parametrize(("a", "b", "equal"), [
    pytest.param("abc", "abc", True, id="equal"),
    pytest.param("abc", "abd", False, id="last-char-differs"),
    pytest.param("abc", "abcd", False, id="prefix"),
    pytest.param("", "", True, id="both-empty"),
    pytest.param("é", "é", True, id="non-ascii-equal"),
    pytest.param("é", "e", False, id="non-ascii-differs"),
])
def test_equality(a: str, b: str, equal: bool) -> None:
    assert (Secret(a) == Secret(b)) is equal
    assert (Secret(a) != Secret(b)) is not equal
    if equal:
        assert hash(Secret(a)) == hash(Secret(b))


def test_equality_uses_constant_time_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.secret as secret_module

    calls: list[tuple[bytes, bytes]] = []
    real = secret_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(secret_module.hmac, "compare_digest", spy)
    assert Secret("abc") == Secret("abc")
    assert Secret("abc") != Secret("xyz")
    assert calls == [(b"abc", b"abc"), (b"abc", b"xyz")]


@pytest.mark.parametrize("other", [VALUE, VALUE.encode(), None, 0],
                         ids=["str", "bytes", "none", "int"])
def test_never_equal_to_a_non_secret(other: Any) -> None:
    assert Secret(VALUE) != other
    assert other != Secret(VALUE)


def test_truthiness_and_set_membership() -> None:
    assert Secret("x") and not Secret("")
    assert {Secret("a"), Secret("a"), Secret("b")} == {Secret("a"), Secret("b")}
