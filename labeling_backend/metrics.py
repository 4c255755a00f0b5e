"""Prometheus metrics of one backend app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class _QueueCollector:
    """Queue depth per queue and state, read from the queue at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, dict[str, int]]]) -> None:
        self._stats = stats

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        depth = GaugeMetricFamily(
            "groundlabel_queue_jobs", "Jobs per queue and state", labels=["queue", "state"]
        )
        up = GaugeMetricFamily("groundlabel_queue_up", "1 when the job queue answers, else 0")
        try:
            stats = self._stats()
        except Exception as exc:  # Redis down: say so instead of failing the scrape
            log.debug("queue stats unavailable: %s", exc)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for queue, states in stats.items():
                for state, count in states.items():
                    depth.add_metric([queue, state], count)
        yield depth
        yield up


class Metrics:
    """Counters and histograms the app updates, exposed in Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_stats: Callable[[], dict[str, dict[str, int]]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "groundlabel_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "groundlabel_request_seconds",
            "HTTP request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "groundlabel_job_seconds",
            "Job latency from enqueue to end, by queue",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_run_seconds = Histogram(
            "groundlabel_job_run_seconds",
            "Time the job function itself took on its worker (the model's share of job_seconds), by queue",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tasks = Counter(
            "groundlabel_tasks",
            "Tasks answered, by where the answer came from",
            ["source"],
            registry=self.registry,
        )
        self.failures = Counter(
            "groundlabel_task_failures",
            "Tasks answered without a prediction, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_QueueCollector(queue_stats))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
