"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.redisproc import RedisServer


def _need_redis() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required in CI (.ci/run installs it)")
        pytest.skip("redis-server not installed (required in CI)")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server per test: tests may kill and restart it."""
    _need_redis()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    _need_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


# The longest test files, run first: pytest-xdist (--dist loadfile) hands files to workers
# in collection order, and a long file collected last would run alone at the end.
_LONGEST_FIRST = (
    "tests/integration/test_catalog_providers.py",
    "tests/integration/test_topologies.py",
    "tests/test_example_config.py",
    "tests/integration/test_live_streams.py",
    "tests/integration/test_stream_faults.py",
    "tests/integration/test_request_path.py",
    "tests/integration/test_replicas.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return _LONGEST_FIRST.index(path) if path in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each file is kept
