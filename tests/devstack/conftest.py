"""Fixtures: one real development stack (separate processes, real TLS) for these tests."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import httpx2
import pytest

from ._helpers import REDIRECT_URI
from ._stack import DevStack, start_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    with start_stack(tmp_path_factory.mktemp("devstack"), redirect_uris=[REDIRECT_URI]) as s:
        yield s


@pytest.fixture(scope="session")
def tls(stack: DevStack) -> ssl.SSLContext:
    return stack.ssl_context()


@pytest.fixture
def http(stack: DevStack, tls: ssl.SSLContext) -> Iterator[httpx2.Client]:
    with httpx2.Client(verify=tls, timeout=15.0) as c:
        yield c



@pytest.fixture
def clean(stack: DevStack) -> Iterator[DevStack]:
    """The stack with counters and /token faults reset before and after the test."""
    stack.admin("POST", "/_admin/reset")
    yield stack
    stack.admin("POST", "/_admin/reset")
