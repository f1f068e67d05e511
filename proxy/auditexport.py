"""Standard exports of the audit trail that keep its proof: OCSF events and OTLP logs.

Both carry the whole record, so that ``credproxy audit verify`` works on what a SIEM gives
back (the chain's ``instance``, ``seq``, ``prev`` and ``hash`` included); the local sink
stays the authoritative trail.

**OCSF** (Open Cybersecurity Schema Framework, schema 1.4.0, https://schema.ocsf.io):
:func:`to_ocsf` maps a record to

* *API Activity* (``class_uid`` 6003, category 6 Application Activity) for the request
  path and everything else: ``activity_id`` from the HTTP method (1 Create: POST, 2 Read:
  GET/HEAD/OPTIONS, 3 Update: PUT/PATCH, 4 Delete: DELETE, 99 Other; 0 Unknown without a
  request), ``api.operation`` = the audit ``event``, ``api.service.name`` = the provider,
  ``http_request`` (method, url hostname and path), ``dst_endpoint.hostname``,
  ``http_response.code`` = the upstream status;
* *Authorize Session* (``class_uid`` 3003, category 3 Identity & Access Management) for
  the identity events ``connection.created`` (``activity_id`` 1 Assign Privileges: a grant
  of delegated access), ``connection.revoked``, ``user.offboarded``, ``identity.rejected``
  and the kill switch's ``suspension.*`` (99 Other);

with ``type_uid`` = ``class_uid * 100 + activity_id``, ``time`` (epoch milliseconds),
``severity_id`` (1 Informational; 3 Medium for a failure), ``status_id`` (1 Success, 2
Failure, 99 Other with ``status`` = the outcome), ``status_code`` = the reason,
``status_detail`` = the detail, ``actor.user`` (the record's actor, else its user),
``src_endpoint.hostname`` (the writing host), ``metadata`` (``product``, ``version``,
``uid`` = the record hash, ``sequence`` = seq, ``correlation_uid`` = the request id,
``log_name`` = the instance) and ``unmapped.credproxy`` = the record, verbatim.
:func:`unwrap` takes that record back and refuses an event whose mapped fields no longer
match it (edited in the SIEM).

**OTLP** (:class:`OtlpExport`): each record becomes one OpenTelemetry log record through
the official SDK (``BatchLogRecordProcessor`` + ``OTLPLogExporter``, OTLP/HTTP protobuf):
``body`` = the record's JSON line (or its OCSF event as JSON), ``event_name`` and the
attributes ``credproxy.instance``, ``credproxy.seq``, ``credproxy.prev``,
``credproxy.hash``, ``credproxy.event``; the resource names ``service.name=credproxy`` and
``service.instance.id``. An export failure never blocks or fails a request: the SDK retries
with backoff within ``timeout``; what it could not deliver, and what did not fit the
bounded queue, is counted; ``credproxy_audit_export_lag_records`` = records written minus
records the collector confirmed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any, Final

from proxy.audit import Record, parse_lines

if TYPE_CHECKING:
    from proxy.settings import ExportSettings

log = logging.getLogger("credproxy.audit.export")

OCSF_VERSION: Final = "1.4.0"
API_ACTIVITY: Final = 6003
AUTHORIZE_SESSION: Final = 3003
_CATEGORY: Final = {API_ACTIVITY: (6, "Application Activity"),
                    AUTHORIZE_SESSION: (3, "Identity & Access Management")}
_CLASS_NAME: Final = {API_ACTIVITY: "API Activity", AUTHORIZE_SESSION: "Authorize Session"}
_API_ACTIVITY: Final = {"POST": (1, "Create"), "GET": (2, "Read"), "HEAD": (2, "Read"),
                        "OPTIONS": (2, "Read"), "PUT": (3, "Update"), "PATCH": (3, "Update"),
                        "DELETE": (4, "Delete")}
_IDENTITY_EVENTS: Final = frozenset({"connection.created", "connection.revoked",
                                     "user.offboarded", "identity.rejected"})
_FAILED: Final = frozenset({"denied", "rejected", "failed", "pending", "error",
                            "unavailable"})
_SUCCEEDED: Final = frozenset({"injected", "refreshed", "connected", "revoked",
                               "offboarded", "applied", "applied_restart_required",
                               "loaded", "signed", "suspended", "lifted", "passed",
                               "required"})


def _version() -> str:
    try:
        return _metadata.version("credproxy")
    except _metadata.PackageNotFoundError:
        return "0"


def _epoch_ms(ts: object) -> int | None:
    if not isinstance(ts, str):
        return None
    try:
        return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None and v != {}}
    return value


def to_ocsf(record: Record, *, product_version: str | None = None) -> dict[str, Any]:
    """The OCSF event for an audit record (see the module docstring); ``unmapped.credproxy``
    is the record itself. Absent values are left out, never ``null``."""
    event = str(record.get("event") or "")
    req = record.get("request") if isinstance(record.get("request"), dict) else None
    identity = event in _IDENTITY_EVENTS or event.startswith("suspension.")
    class_uid = AUTHORIZE_SESSION if identity else API_ACTIVITY
    if identity:
        activity = (1, "Assign Privileges") if event == "connection.created" else (99, "Other")
    elif req is None:
        activity = (0, "Unknown") if event.startswith(("credential.", "request.")) \
            else (99, "Other")
    else:
        activity = _API_ACTIVITY.get(str(req.get("method") or "").upper(), (99, "Other"))
    outcome = str(record.get("outcome") or "")
    if outcome in _FAILED:
        status_id, status = 2, "Failure"
    elif outcome in _SUCCEEDED:
        status_id, status = 1, "Success"
    else:
        status_id, status = 99, outcome or "Other"
    actor = record.get("actor") if isinstance(record.get("actor"), dict) else None
    if actor is not None:
        user: dict[str, Any] = {"uid": actor.get("id"), "name": actor.get("id"),
                                "type": actor.get("kind")}
    else:
        user = {"uid": record.get("user"), "name": record.get("user")}
    instance = str(record.get("instance") or "")
    category_uid, category_name = _CATEGORY[class_uid]
    out: dict[str, Any] = {
        "class_uid": class_uid,
        "class_name": _CLASS_NAME[class_uid],
        "category_uid": category_uid,
        "category_name": category_name,
        "activity_id": activity[0],
        "activity_name": activity[1],
        "type_uid": class_uid * 100 + activity[0],
        "type_name": f"{_CLASS_NAME[class_uid]}: {activity[1]}",
        "time": _epoch_ms(record.get("ts")),
        "severity_id": 3 if status_id == 2 else 1,
        "severity": "Medium" if status_id == 2 else "Informational",
        "status_id": status_id,
        "status": status,
        "status_code": record.get("reason"),
        "status_detail": record.get("detail"),
        "message": f"{event} {outcome}",
        "actor": {"user": user},
        "src_endpoint": {"hostname": instance.split("/", 1)[0] or None},
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "credproxy", "vendor_name": "credproxy",
                        "version": product_version or _version()},
            "uid": record.get("hash"),
            "sequence": record.get("seq"),
            "log_name": instance or None,
            "correlation_uid": req.get("id") if req else None,
            "original_time": record.get("ts"),
        },
    }
    if class_uid == API_ACTIVITY:
        out["api"] = {"operation": event,
                      "service": {"name": record.get("provider")},
                      "request": {"uid": req.get("id") if req else None}}
    else:
        out["service"] = {"name": record.get("provider")}
        if record.get("user") is not None:
            out["user"] = {"uid": record.get("user"), "name": record.get("user")}
    if req is not None:
        out["http_request"] = {"http_method": req.get("method"),
                               "url": {"hostname": req.get("host"), "path": req.get("path")}}
        out["dst_endpoint"] = {"hostname": req.get("host")}
    if record.get("upstream_status") is not None:
        out["http_response"] = {"code": record.get("upstream_status")}
    event_out: dict[str, Any] = _drop_none(out)
    event_out["unmapped"] = {"credproxy": record}
    return event_out


def _differs(expected: Any, got: Any, path: str = "") -> str | None:
    """The first field of ``expected`` that ``got`` lacks or has otherwise (extra fields in
    ``got``, added by a SIEM, are fine)."""
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return path or "."
        for key, value in expected.items():
            where = _differs(value, got.get(key), f"{path}.{key}" if path else key)
            if where is not None:
                return where
        return None
    return None if expected == got else path


def unwrap(obj: Record) -> Record | str:
    """The audit record an object holds: an OCSF event (``class_uid`` and
    ``unmapped.credproxy``) gives its carried record once its mapped fields still match it
    (else a problem naming the first field that differs); anything else is returned as is."""
    if "class_uid" not in obj:
        return obj
    unmapped = obj.get("unmapped")
    carried = unmapped.get("credproxy") if isinstance(unmapped, dict) else None
    if not isinstance(carried, dict):
        return "OCSF event without unmapped.credproxy (not exported by credproxy)"
    version = obj.get("metadata", {}).get("product", {}).get("version") \
        if isinstance(obj.get("metadata"), dict) else None
    expected = to_ocsf(carried, product_version=version if isinstance(version, str) else None)
    expected.pop("unmapped")
    where = _differs(expected, obj)
    if where is not None:
        return f"OCSF field {where} does not match the carried record (edited after export)"
    return carried


def ocsf_lines(lines: Iterable[str]) -> Iterator[str]:
    """``credproxy audit export --format ocsf``: one OCSF event per record line (compact
    JSON); other lines are dropped."""
    for _, rec, _err in parse_lines(lines):
        if rec is not None:
            yield json.dumps(to_ocsf(rec), separators=(",", ":"), ensure_ascii=True)


# --- OTLP -------------------------------------------------------------------------------


class ExportCounters:
    """What the exporter reports, for metrics (thread-safe: called from the SDK's worker).

    ``written``: records handed to the export; ``exported``: confirmed by the collector;
    ``failed``: batches the SDK gave up on after its retries (records); ``dropped``:
    records not queued because the queue was full. ``lag`` = written - exported.
    """

    def __init__(self, on_change: Callable[[str, int], None] | None = None) -> None:
        self._lock = threading.Lock()
        self.written = self.exported = self.failed = self.dropped = 0
        self._on_change = on_change

    def add(self, kind: str, n: int) -> None:
        with self._lock:
            setattr(self, kind, getattr(self, kind) + n)
        if self._on_change is not None:
            self._on_change(kind, n)

    @property
    def lag(self) -> int:
        return self.written - self.exported

    @property
    def pending(self) -> int:
        """Records queued or in flight (neither confirmed nor given up on)."""
        return self.written - self.exported - self.failed


def _counting_exporter(inner: Any, counters: ExportCounters) -> Any:
    """The OTLP exporter wrapped to count confirmed and failed records."""
    from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult

    class Counting(LogRecordExporter):  # type: ignore[misc,unused-ignore]
        def export(self, batch: Sequence[Any]) -> LogRecordExportResult:
            try:
                result: LogRecordExportResult = inner.export(batch)
            except Exception:
                counters.add("failed", len(batch))
                log.warning("audit export of %d records failed (an exception); the local "
                            "trail has them", len(batch))
                raise
            if result is LogRecordExportResult.SUCCESS:
                counters.add("exported", len(batch))
            else:
                counters.add("failed", len(batch))
                log.warning("audit export of %d records failed after retries; the local "
                            "trail has them", len(batch))
            return result

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(inner.force_flush(timeout_millis))

    return Counting()


class OtlpExport:
    """Sends each audit record as an OpenTelemetry log record (OTLP/HTTP protobuf) through
    the SDK's ``BatchLogRecordProcessor``; call :meth:`emit` with each record written
    (:class:`proxy.audit.AuditLog` ``on_record``), :meth:`close` at shutdown (flushes).

    Never blocks and never raises from :meth:`emit`: at most ``max_queue`` records wait;
    beyond that a record is counted as dropped from the export (the local trail has it).
    Raises :class:`proxy.errors.ConfigError` at construction when a ``headers_env``
    variable is unset.
    """

    def __init__(self, settings: ExportSettings, *, instance: str,
                 environ: Mapping[str, str] = os.environ,
                 counters: ExportCounters | None = None) -> None:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.resources import Resource

        from proxy.errors import ConfigError

        otlp = settings.otlp
        assert otlp is not None
        headers: dict[str, str] = {}
        for name, var in otlp.headers_env.items():
            value = environ.get(var, "")
            if not value:
                raise ConfigError(f"audit.export.otlp.headers_env: env var {var} (for header "
                                  f"{name}) is not set or is empty")
            headers[name] = value
        self.counters = counters or ExportCounters()
        self._format = settings.format
        self._max_queue = otlp.max_queue
        exporter = OTLPLogExporter(endpoint=otlp.endpoint, headers=headers or None,
                                   timeout=otlp.timeout,
                                   certificate_file=otlp.ca_file)
        self._provider = LoggerProvider(resource=Resource.create({
            "service.name": "credproxy", "service.instance.id": instance}))
        self._provider.add_log_record_processor(BatchLogRecordProcessor(
            _counting_exporter(exporter, self.counters),
            schedule_delay_millis=otlp.delay * 1000, max_export_batch_size=otlp.batch,
            export_timeout_millis=otlp.timeout * 1000,
            # Larger than what emit lets in: the SDK's own queue never overflows silently.
            max_queue_size=otlp.max_queue + otlp.batch))
        self._logger = self._provider.get_logger("credproxy.audit", _version())

    def emit(self, record: Record) -> None:
        from opentelemetry._logs import SeverityNumber

        if self.counters.pending >= self._max_queue:
            self.counters.add("dropped", 1)
            return
        body = to_ocsf(record) if self._format == "ocsf" else record
        ms = _epoch_ms(record.get("ts"))
        self.counters.add("written", 1)
        try:
            self._logger.emit(
                timestamp=ms * 1_000_000 if ms is not None else None,
                severity_number=SeverityNumber.INFO, severity_text="INFO",
                body=json.dumps(body, separators=(",", ":"), ensure_ascii=True),
                event_name=str(record.get("event")),
                attributes={"credproxy.instance": str(record["instance"]),
                            "credproxy.seq": int(record["seq"]),
                            "credproxy.prev": record["prev"] or "",
                            "credproxy.hash": str(record["hash"]),
                            "credproxy.event": str(record.get("event"))})
        except Exception:
            self.counters.add("failed", 1)
            log.exception("audit export: a record could not be queued")

    def flush(self, timeout: float = 10.0) -> bool:
        return bool(self._provider.force_flush(int(timeout * 1000)))

    def close(self) -> None:
        self._provider.shutdown()
