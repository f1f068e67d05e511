"""The addon tests reuse the core's identity fixtures (signing keys, context factory)."""

from tests.proxy.conftest import keys, make_context  # noqa: F401
