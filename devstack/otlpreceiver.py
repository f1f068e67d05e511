"""A small OTLP/HTTP logs receiver: what an OpenTelemetry Collector's ``otlp`` receiver
does for ``POST /v1/logs`` (``application/x-protobuf``), as the SDK's own tests do it.

The Collector (``otelcol``) is a Go binary on no registry this environment installs from;
this parses ``ExportLogsServiceRequest`` with ``opentelemetry-proto`` and keeps every log
record (body, attributes, resource attributes), so tests can rebuild the audit lines a SIEM
would hold and run ``credproxy audit verify`` on them.

``fail_with``: answer every export with this HTTP status (a collector that is down or
refusing: 503 is retryable for the SDK, 400 is not).
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


@dataclass(frozen=True)
class Received:
    body: Any
    attributes: dict[str, Any]
    resource: dict[str, Any]
    event_name: str
    time_unix_nano: int


class OtlpReceiver:
    """Serve on 127.0.0.1 (a free port) in a thread; :attr:`endpoint` is the logs URL."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.requests = 0
        self.fail_with: int | None = None
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                data = self.rfile.read(length)
                with receiver._lock:
                    receiver.requests += 1
                    fail = receiver.fail_with
                if self.path != "/v1/logs":
                    self.send_error(404)
                    return
                if fail is not None:
                    self.send_response(fail)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                req = ExportLogsServiceRequest()
                req.ParseFromString(data)
                got = []
                for rl in req.resource_logs:
                    resource = {kv.key: _value(kv.value) for kv in rl.resource.attributes}
                    for sl in rl.scope_logs:
                        for lr in sl.log_records:
                            got.append(Received(
                                _value(lr.body),
                                {kv.key: _value(kv.value) for kv in lr.attributes},
                                resource, lr.event_name, lr.time_unix_nano))
                with receiver._lock:
                    receiver.received.extend(got)
                out = ExportLogsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="otlp-receiver")
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/logs"

    def bodies(self) -> list[Any]:
        with self._lock:
            return [r.body for r in self.received]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
