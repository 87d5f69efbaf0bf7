"""Prometheus metrics: request counts and latencies (this process), and, read from Redis at
scrape time, queue depths, workers, jobs by kind and status and job seconds (all workers)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis import Redis
from redis.exceptions import RedisError
from rq import Worker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas import keys
from service.deps import queue


class RedisCollector:
    def __init__(self, conn: Callable[[], Redis]) -> None:
        self.conn = conn

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily("inspector_queue_depth", "jobs waiting per queue", labels=["queue"])
        workers = GaugeMetricFamily("inspector_workers", "workers registered per queue", labels=["queue"])
        jobs = CounterMetricFamily("inspector_jobs", "jobs ended, by kind and status", labels=["kind", "status"])
        seconds = CounterMetricFamily("inspector_job_seconds", "seconds spent in jobs, by kind", labels=["kind"])
        try:
            conn = self.conn()
            for name in keys.QUEUES:
                depth.add_metric([name], queue(name, conn).count)
                workers.add_metric([name], Worker.count(queue=queue(name, conn)))
            for field, value in conn.hgetall(keys.STATS_KEY).items():
                parts = (field.decode() if isinstance(field, bytes) else str(field)).split(":")
                if parts[0] == "jobs" and len(parts) == 3:
                    jobs.add_metric(parts[1:], float(value))
                elif parts[0] == "seconds" and len(parts) == 2:
                    seconds.add_metric(parts[1:], float(value))
        except RedisError:
            return []
        return [depth, workers, jobs, seconds]


class Metrics:
    def __init__(self, conn: Callable[[], Redis]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "inspector_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "inspector_http_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry
        )
        self.submitted = Counter(
            "inspector_jobs_submitted", "jobs submitted", ["kind", "deduplicated"], registry=self.registry
        )
        self.registry.register(RedisCollector(conn))  # type: ignore[arg-type]

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """Pure ASGI middleware counting requests and timing them by route template
        (Starlette's ``BaseHTTPMiddleware`` would cost a task group and two memory streams
        per request)."""

        async def observed(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = 500  # what the client gets when the app raises before responding

            async def watched(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            t0 = time.perf_counter()
            try:
                await app(scope, receive, watched)
            finally:
                # The router leaves the matched route in the scope: its template, not the raw path.
                route = getattr(scope.get("route"), "path", "unmatched")
                self.latency.labels(scope["method"], route).observe(time.perf_counter() - t0)
                self.requests.labels(scope["method"], route, str(status)).inc()

        return observed
