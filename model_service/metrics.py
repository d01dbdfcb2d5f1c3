"""The worker's Prometheus metrics (its own registry, served at the worker's /metrics)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from model_service.activity import WorkerStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class WorkerMetrics:
    def __init__(self, model_id: str, stats: WorkerStats) -> None:
        self.registry = CollectorRegistry()
        labels = {"model": model_id}
        self._generation_seconds = Histogram(
            "pool_worker_generation_seconds",
            "Time from submitting a generation to its last token.",
            ["model"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        ).labels(**labels)
        self._ttft_seconds = Histogram(
            "pool_worker_time_to_first_token_seconds",
            "Time from submitting a streamed generation to its first token.",
            ["model"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        ).labels(**labels)
        self._tokens_out = Counter(
            "pool_worker_completion_tokens",
            "Tokens generated.",
            ["model"],
            registry=self.registry,
        ).labels(**labels)
        in_flight = Gauge(
            "pool_worker_in_flight_requests",
            "Inference requests being served.",
            ["model"],
            registry=self.registry,
        ).labels(**labels)
        in_flight.set_function(lambda: stats.in_flight)
        served = Gauge(
            "pool_worker_requests_served",
            "Inference requests finished since start.",
            ["model"],
            registry=self.registry,
        ).labels(**labels)
        served.set_function(lambda: stats.requests_served)

    def observe_generation(
        self, started: float, first_token_at: float | None, completion_tokens: int
    ) -> None:
        now = time.perf_counter()
        self._generation_seconds.observe(now - started)
        if first_token_at is not None:
            self._ttft_seconds.observe(first_token_at - started)
        self._tokens_out.inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
