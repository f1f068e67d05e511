"""Prometheus metrics. Labels are providers, outcomes and fixed reason slugs only: never
user ids, hosts of unrouted requests, or anything a client or provider can choose freely."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy import reasons

# Latency buckets (seconds) for whole requests and upstream exchanges: API calls from tens
# of milliseconds to long model calls.
_LATENCY_BUCKETS = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def reason_label(reason: str | None) -> str:
    """A reason as a label value: a code of the one registry (:mod:`proxy.reasons`), a
    family's name for ``<family>:<code>``, anything else ``"other"``."""
    return reasons.label(reason)


def code_class(status: int) -> str:
    """``"2xx"`` ... ``"5xx"`` for an HTTP status; anything else ``"other"``."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """Every credproxy metric, on one registry (the one the admin server's ``/metrics``
    exposes), plus prometheus-client's process, platform and GC collectors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        Info("credproxy_build", "Versions of credproxy and what it runs on", registry=r).info(
            {"version": _version("credproxy"), "mitmproxy": _version("mitmproxy"),
             "python": platform.python_version()})
        self.config_info = Info("credproxy_config", "Digest of the running configuration "
                                "(sha256 of its canonical JSON, first 16 hex digits)",
                                registry=r)
        self.config_last_reload = Gauge("credproxy_config_last_reload_timestamp_seconds",
                                        "When the running configuration was loaded or last "
                                        "reloaded (unix time)", registry=r)
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
        self.forced_refreshes = Counter(
            "credproxy_forced_refreshes", "Refreshes forced by an upstream 401 on a token the "
            "proxy believed valid, by result (refreshed, superseded, reauth, failed)",
            ["provider", "result"], registry=r)
        self.clock_skew = Gauge("credproxy_provider_clock_skew_seconds",
                                "The provider's clock minus the local clock, from the Date "
                                "header of its last credentialed response (1 s resolution)",
                                ["provider"], registry=r)
        self.subscribed = Gauge("credproxy_coordination_subscribed",
                                "1 while this replica is subscribed to Redis invalidations "
                                "(a replica that is not misses revocations until it "
                                "resubscribes and drops its caches), else 0", registry=r)
        self.fencing = Gauge("credproxy_coordination_fencing",
                             "1 while token refreshes are held back after Redis lost its data "
                             "(the fencing period), else 0", registry=r)
        self.suspensions = Gauge("credproxy_suspensions",
                                 "Suspensions in force on this replica (credproxy suspend), "
                                 "by kind: user, context, provider", ["kind"], registry=r)
        self.suspensions_synced = Gauge("credproxy_suspensions_synced_timestamp_seconds",
                                        "When this replica last read the suspensions (unix "
                                        "time; 0 = never: credentialed requests are refused)",
                                        registry=r)
        self.suspension_errors = Counter("credproxy_suspension_read_failures",
                                         "Reads of the suspensions that failed (the last "
                                         "list read stays in force)", registry=r)
        self.dependency_up = Gauge("credproxy_dependency_up",
                                   "Whether a shared dependency (vault, coordination) answered "
                                   "the last /readyz check; 0 = the proxy runs degraded",
                                   ["dependency"], registry=r)
        self.upstream_responses = Counter("credproxy_upstream_responses",
                                          "Upstream answers to credentialed requests, by "
                                          "status class", ["provider", "code_class"],
                                          registry=r)
        self.upstream_errors = Counter("credproxy_upstream_errors",
                                       "Exchanges that failed after the decision: the "
                                       "destination unreachable, or the exchange broken off",
                                       ["provider", "kind"], registry=r)
        self.request_duration = Histogram("credproxy_request_duration_seconds",
                                          "Whole request through the proxy, from the request "
                                          "head to the end of the response",
                                          ["provider"], registry=r, buckets=_LATENCY_BUCKETS)
        self.upstream_duration = Histogram("credproxy_upstream_duration_seconds",
                                           "Upstream exchange: request sent to response "
                                           "headers received", ["provider"], registry=r,
                                           buckets=_LATENCY_BUCKETS)
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
        self.audit_export = Counter(
            "credproxy_audit_export_records", "Audit records in the OTLP export: exported "
            "(confirmed by the collector), failed (given up after the SDK's retries), dropped "
            "(the export queue was full); the local trail has them all", ["outcome"],
            registry=r)
        self.audit_export_lag = Gauge(
            "credproxy_audit_export_lag_records", "Audit records written locally and not "
            "(yet) confirmed by the OTLP collector", registry=r)
        self.audit_checkpoints = Counter(
            "credproxy_audit_checkpoints", "Signed audit checkpoints: written, failed (not "
            "written; retried with the next record), sink_failed (a copy the checkpoint sink "
            "missed; retried with the next checkpoint)", ["outcome"], registry=r)

    def config_applied(self, digest: str, at: float) -> None:
        """Record the configuration now running (at start and after every applied reload)."""
        self.config_info.info({"digest": digest})
        self.config_last_reload.set(at)

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
