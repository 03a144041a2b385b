"""Prometheus metrics for one worker process, and the HTTP endpoint that serves them.

Takes nothing global: :class:`Metrics` owns its own ``CollectorRegistry``, so several stages
(``mailroute run``) or several tests can live in one process.  :class:`MetricsServer` serves
``/metrics`` (``?name[]=<sample name>`` for only those samples), ``/healthz`` (the process
is alive) and ``/readyz`` (every stage in it is connected and consuming) on one port.
Fails only at start, if the port cannot be bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
# A canary's trip through a user's forwarding rule, the forward mailbox and the pipeline.
ROUNDTRIP_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600)


class Metrics:
    """Every metric a mailroute process exports; one instance per process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages_in = Counter(
            "mailroute_stage_messages_in", "Messages a stage took from its queue",
            ["stage"], registry=r)
        self.messages_out = Counter(
            "mailroute_stage_messages_out", "Messages a stage published (confirmed)",
            ["stage"], registry=r)
        self.messages_retried = Counter(
            "mailroute_stage_messages_retried", "Attempts a stage repeated after a passing error",
            ["stage"], registry=r)
        self.messages_dead = Counter(
            "mailroute_stage_messages_dead_lettered", "Messages a stage dead-lettered, by reason",
            ["stage", "reason"], registry=r)
        self.processing_seconds = Histogram(
            "mailroute_stage_processing_seconds", "Time to handle one message in a stage",
            ["stage"], registry=r, buckets=LATENCY_BUCKETS)
        self.end_to_end_seconds = Histogram(
            "mailroute_end_to_end_latency_seconds",
            "From arrival in the mailbox to the committed record",
            registry=r, buckets=LATENCY_BUCKETS)
        self.mailbox_polls = Counter(
            "mailroute_mailbox_polls", "Mailbox polls by outcome (success, failure)",
            ["mailbox", "outcome"], registry=r)
        self.mailbox_fetched = Counter(
            "mailroute_mailbox_messages_fetched", "Messages fetched from a mailbox and confirmed",
            ["mailbox"], registry=r)
        self.mailbox_last_success = Gauge(
            "mailroute_mailbox_last_success_timestamp_seconds",
            "Unix time of the mailbox's last successful poll", ["mailbox"], registry=r)
        self.queue_redeclared = Counter(
            "mailroute_stage_queue_redeclared", "Times a stage found its input queue missing "
            "(deleted) and declared it again; replay from the journal (see the log)",
            ["stage"], registry=r)
        self.mailbox_alerts = Counter(
            "mailroute_mailbox_alerts", "Alerts raised for a mailbox, by kind (auth, "
            "uidvalidity, disabled)", ["mailbox", "kind"], registry=r)
        self.mailbox_deferred = Counter(
            "mailroute_mailbox_deferred", "Polls put off because the mailbox's account had "
            "its server profile's max_connections open", ["mailbox"], registry=r)
        self.mailbox_status = Gauge(
            "mailroute_mailbox_status", "1 for the mailbox's current status (not-run, success, "
            "failing, disabled), 0 for the others", ["mailbox", "status"], registry=r)
        self.leases_held = Gauge(
            "mailroute_ingest_leases_held", "Mailboxes this ingest process holds a lease on",
            registry=r)
        self.push_sessions = Gauge(
            "mailroute_ingest_push_sessions", "IMAP IDLE sessions this ingest process holds",
            registry=r)
        self.ready = Gauge(
            "mailroute_stage_ready", "1 while the stage is connected and consuming",
            ["stage"], registry=r)
        # Mail the pipeline deliberately leaves untracked (route: tracking-off,
        # not-a-reply-to-tracked-mail, sender-not-a-contact, sender-missing-or-ambiguous,
        # suppressed-by-rule), counted by the stage that decided it, with the reason.
        self.messages_untracked = Counter(
            "mailroute_messages_untracked", "Deliveries left untracked, by stage and reason",
            ["stage", "reason"], registry=r)

        # Canaries (ingest.canary): marked test messages sent to each forwarding user and
        # expected in the forward mailbox; sent and failed by ingest, seen by persist.
        self.canary_sent = Counter(
            "mailroute_canary_sent", "Canaries handed to the users' mail server",
            ["principal"], registry=r)
        self.canary_failed = Counter(
            "mailroute_canary_failed", "Canaries that could not be handed over",
            ["principal"], registry=r)
        self.canary_seen = Counter(
            "mailroute_canary_seen", "Canaries that arrived through the forward mailbox",
            ["principal"], registry=r)
        self.canary_missing = Gauge(
            "mailroute_canary_missing", "1 while the user's newest canary verdict is "
            "missing (not seen in the forward mailbox within the deadline), else 0",
            ["principal"], registry=r)
        self.canary_roundtrip = Histogram(
            "mailroute_canary_roundtrip_seconds",
            "From sending a canary to persist seeing it come through the forward mailbox",
            registry=r, buckets=ROUNDTRIP_BUCKETS)

    def watch(self, collector: Any) -> None:
        """Register a custom collector (queue depths) with this process's registry."""
        self.registry.register(collector)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """Serves /metrics, /healthz and /readyz on (host, port) in a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int,
                 readiness: Callable[[], Iterable[bool]] | None = None) -> None:
        self._metrics = metrics
        self._readiness = readiness or (lambda: [True])
        self._server = make_server(host, port, self._app, server_class=_ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        self.port = self._server.server_port
        self.host = host
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            # ?name[]=<sample name> (repeatable) serves only those samples, as client_python's
            # own handler does: a poller that wants one figure does not make the worker render
            # and send every series.
            names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
            registry: Any = (self._metrics.registry.restricted_registry(names) if names
                             else self._metrics.registry)
            body = generate_latest(registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ready = all(self._readiness())
            start_response("200 OK" if ready else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [b"ready\n" if ready else b"not ready\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
