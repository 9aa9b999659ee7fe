"""What a server says of itself: Prometheus metrics (``GET /metrics``, from
``prometheus_client``) and, when stdout is not a terminal, one structured access-log line
per request.

Metrics: ``dlrm_requests_total`` by endpoint and status, ``dlrm_request_seconds`` (latency
by endpoint), ``dlrm_batch_rows`` (rows per forward pass), ``dlrm_queue_depth`` (requests
waiting to be scored) and ``dlrm_model_info`` (the version, checkpoint and step served:
1, and 0 for those a reload replaced).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

Scope = dict[str, Any]
_LINE = '{"event": "request", "method": "%s", "path": %s, "status": %d, "ms": %.3f}\n'
ASGI = Callable[[Scope, Callable, Callable], Awaitable[None]]


class Telemetry:
    """The metrics of one server process; of all the workers together where
    ``PROMETHEUS_MULTIPROC_DIR`` is set (``dlrm serve --workers N``: each worker writes its
    values there, ``render`` sums them, ``prometheus_client``'s multiprocess mode)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = CollectorRegistry()
        self.requests = Counter("dlrm_requests", "Requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("dlrm_request_seconds", "Seconds from request to answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("dlrm_batch_rows", "Rows scored per forward pass",
                                    buckets=ROWS_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("dlrm_queue_depth", "Requests waiting to be scored",
                                 registry=self.registry, multiprocess_mode="livesum")
        self.model = Gauge("dlrm_model_info", "The model directory served: 1 for the "
                           "version serving, 0 for those it replaced",
                           ["version", "checkpoint", "step"], registry=self.registry,
                           multiprocess_mode="livemax")

    def serving(self, version: dict[str, str], previous: dict[str, str] | None) -> None:
        if previous is not None:
            self.model.labels(**previous).set(0)
        self.model.labels(**version).set(1)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)


class Instrumented:
    """ASGI middleware: every HTTP request counted and timed by its endpoint (a path of
    ``endpoints``, else "other", so that stray paths add no series), and logged, one JSON
    line on stdout, where stdout is not a terminal or ``access_log`` says so."""

    def __init__(self, app: ASGI, telemetry: Telemetry, endpoints: frozenset[str],
                 access_log: bool | None = None) -> None:
        self.app, self.telemetry, self.endpoints = app, telemetry, endpoints
        self.log = (not sys.stdout.isatty()) if access_log is None else access_log

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - start
            path = scope["path"]
            endpoint = path if path in self.endpoints else "other"
            self.telemetry.requests.labels(endpoint, str(status[0])).inc()
            self.telemetry.latency.labels(endpoint).observe(seconds)
            if self.log:  # one format, json.dumps only for the one free-form field
                sys.stdout.write(_LINE % (scope["method"], json.dumps(path), status[0],
                                          seconds * 1000))
