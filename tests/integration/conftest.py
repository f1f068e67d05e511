"""Fixtures that run the real stack: authorization server, document API, credproxy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = build_stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.close()


@pytest.fixture
def marker() -> str:
    """A unique path segment: lets a test ask the upstream whether a request reached it."""
    return f"m-{uuid.uuid4().hex[:12]}"


_users = iter(range(1_000_000))


@pytest.fixture
def user(stack: Stack) -> str:
    """A fresh user with a valid connection to the docs provider."""
    name = f"alice-{next(_users)}"
    stack.vault_put(name, stack.grant(name))
    return name


def new_stack(tmp: Path, **kw: object) -> Stack:
    return build_stack(tmp, **kw)  # type: ignore[arg-type]
