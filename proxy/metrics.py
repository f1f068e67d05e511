"""Prometheus metrics. Labels are providers, outcomes and fixed reason slugs only: never
user ids, hosts of unrouted requests, or anything a client or provider can choose freely."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Reasons that may appear as label values; anything else is counted as "other".
_REASONS = frozenset({
    "missing", "malformed", "bad-signature", "alg-not-allowed", "alg-key-mismatch",
    "unknown-kid", "expired", "not-yet-valid", "lifetime-too-long", "wrong-issuer",
    "wrong-audience", "wrong-typ", "missing-claim", "duplicate-header", "oversized",
    "replayed", "keys-unavailable", "host_mismatch", "bad_destination", "insecure_transport",
    "context_excludes_provider", "method_not_allowed", "unrouted", "no_connection",
    "invalid_grant", "revoked_upstream", "token_superseded", "revoked",
    "token_endpoint_unavailable", "token_endpoint_error", "vault_unavailable",
    "vault_record_corrupt", "vault_write_failed", "coordination_unavailable",
    "audit-write-failed", "audit-sink-stalled", "internal-error", "lookalike-header",
    "bad-field-name", "obs-fold", "control-character", "bad-connection", "target_mismatch",
    "bad_target", "trailers",
    "upstream_unreachable", "upstream_protocol_error", "client_protocol_error",
})

CONTENT_TYPE = CONTENT_TYPE_LATEST


def reason_label(reason: str | None) -> str:
    return reason if reason in _REASONS else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("credproxy_requests", "Requests seen by the proxy, by provider "
                                "(\"-\" = unrouted) and outcome", ["provider", "outcome"],
                                registry=r)
        self.injections = Counter("credproxy_injections", "Credentials injected",
                                  ["provider", "source"], registry=r)
        self.denials = Counter("credproxy_denials", "Requests refused by the proxy",
                               ["provider", "problem", "reason"], registry=r)
        self.refreshes = Counter("credproxy_refreshes", "Token refreshes at providers",
                                 ["provider", "result"], registry=r)
        self.refresh_seconds = Histogram("credproxy_refresh_seconds",
                                         "Token refresh latency (including retries)",
                                         ["provider"], registry=r,
                                         buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.reauth = Counter("credproxy_reauth_events", "Requests answered reauth-required",
                              ["provider", "reason"], registry=r)
        self.vault_errors = Counter("credproxy_vault_errors", "Vault operations that failed",
                                    ["kind"], registry=r)
        self.coordination_errors = Counter("credproxy_coordination_errors",
                                           "Redis coordination operations that failed",
                                           registry=r)
        self.config_reloads = Counter("credproxy_config_reloads", "Configuration reloads",
                                      ["result"], registry=r)
        self.audit_failures = Counter("credproxy_audit_write_failures",
                                      "Audit records that could not be written", registry=r)
        self.upstream_errors = Counter("credproxy_upstream_errors",
                                       "Exchanges that failed after the decision: the "
                                       "destination unreachable, or the exchange broken off",
                                       ["provider", "kind"], registry=r)
        self.audit_sink_failures = Counter(
            "credproxy_audit_sink_failures", "Audit sink failures: a file that could not be "
            "(re)opened, a failed write, a record refused because stdout stalled or its buffer "
            "was full, a size rotation that failed", ["kind"], registry=r)
        self.audit_reopens = Counter(
            "credproxy_audit_reopens", "Audit file reopened: rotated (the path named another "
            "file or none), size (built-in rotation), signal (SIGHUP/SIGUSR1), error (after a "
            "failed write)", ["reason"],
            registry=r)
        self.audit_dropped = Counter(
            "credproxy_audit_records_dropped", "Audit records accepted into the stdout buffer "
            "and then lost to a failed write (the chain shows the gap)", registry=r)

    def audit_events(self) -> AuditSinkMetrics:
        """The audit sink's events (proxy.audit.SinkEvents) as these counters."""
        return AuditSinkMetrics(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AuditSinkMetrics:
    """Counts what an audit sink reports (called from the sink's writer thread too:
    prometheus-client counters are thread-safe)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def reopened(self, reason: str) -> None:
        self._m.audit_reopens.labels(reason).inc()

    def failed(self, kind: str) -> None:
        self._m.audit_sink_failures.labels(kind).inc()

    def dropped(self, records: int) -> None:
        self._m.audit_dropped.inc(records)
