"""Prometheus metrics of the node, served on ``web.metrics_port`` (bound to ``web.host``).

Labels never carry patient data: job states, stage names, modalities, peer names from the config.
Queue depths and series counts are read from the database at scrape time (a custom collector),
so they are right after a restart too.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server

log = logging.getLogger(__name__)

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class _DatabaseCollector:
    """Job and series counts per state, read from the database when scraped."""

    def __init__(self, db: Any, pool: Any = None, outbox: Any = None) -> None:
        self.db = db
        self.pool = pool
        self.outbox = outbox

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs in the database by state", labels=["state"])
        series = GaugeMetricFamily("dicomnode_series", "Series in the database by state", labels=["state"])
        try:
            for state, n in sorted(count_by_state(self.db.list_jobs(limit=100_000)).items()):
                jobs.add_metric([state], n)
            for state, n in sorted(count_by_state(self.db.list_series(limit=100_000)).items()):
                series.add_metric([state], n)
        except Exception:  # noqa: BLE001 - a scrape must not crash the node
            log.exception("metrics: database read failed")
        yield jobs
        yield series
        if self.outbox is not None:
            ob = GaugeMetricFamily("dicomnode_outbox", "Result objects in the outbox by state", labels=["state"])
            try:
                for state, n in sorted(self.outbox.counts().items()):
                    ob.add_metric([state], n)
            except Exception:  # noqa: BLE001
                log.exception("metrics: outbox read failed")
            yield ob
        if self.pool is not None:
            g = GaugeMetricFamily("dicomnode_jobs_in_flight", "Jobs running in this process now")
            g.add_metric([], self.pool.in_flight())
            yield g


def count_by_state(records: list[Any]) -> dict[str, int]:
    """``{state: count}`` over records with a ``state`` attribute."""
    out: dict[str, int] = {}
    for r in records:
        out[r.state] = out.get(r.state, 0) + 1
    return out


class NodeMetrics:
    """The node's metrics on their own registry (tests can make several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.jobs_finished = Counter("dicomnode_jobs_finished", "Jobs finished, by outcome", ["state"],
                                     registry=self.registry)
        self.stage_seconds = Histogram("dicomnode_stage_seconds", "Pipeline stage duration", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.job_seconds = Histogram("dicomnode_job_seconds", "Whole pipeline duration per job",
                                     buckets=STAGE_BUCKETS, registry=self.registry)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def observe_outcome(self, outcome: Any) -> None:
        """Count a finished job and its stage timings (``JobOutcome``)."""
        self.jobs_finished.labels(outcome.state).inc()
        for stage, seconds in outcome.timings:
            self.stage_seconds.labels(stage).observe(seconds)
        if outcome.state == "done":
            self.job_seconds.observe(outcome.total_s)

    def watch_database(self, db: Any, pool: Any = None, outbox: Any = None) -> None:
        """Export job/series (and outbox) counts per state at scrape time."""
        self.registry.register(_DatabaseCollector(db, pool, outbox))

    def serve(self, host: str, port: int, token: str = "") -> int:
        """Start the /metrics HTTP server on ``host:port`` (0 picks a port); returns the port.

        With ``token`` every request needs ``Authorization: Bearer <token>`` (else 401), like the
        status page. Raises OSError when the port cannot be bound.
        """
        if not token:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        else:
            server, thread = _token_server(host, port, self.registry, token)
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def stop(self) -> None:
        """Stop the HTTP server, if started."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _token_server(host: str, port: int, registry: CollectorRegistry, token: str) -> tuple[Any, threading.Thread]:
    """A /metrics server that answers 401 unless the bearer token matches (compared in constant time)."""
    import hmac
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - never log requests
            return

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            header = self.headers.get("Authorization", "")
            given = header[7:] if header.startswith("Bearer ") else ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                status, body, ctype = 401, b"unauthorised\n", "text/plain; charset=utf-8"
            else:
                status, body, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
