"""The worker's Prometheus metrics (its own registry, served at the worker's /metrics)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from model_service.activity import WorkerStats, count_usage
from model_service.engine import Finished

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

        self._tokens_in = Counter(
            "pool_worker_prompt_tokens",
            "Prompt tokens received.",
            ["model"],
            registry=self.registry,
        ).labels(**labels)
        self._tokens_cached = Counter(
            "pool_worker_cached_prompt_tokens",
            "Prompt tokens served from the KV cache instead of computed.",
            ["model"],
            registry=self.registry,
        ).labels(**labels)
        self._requests = Counter(
            "pool_worker_requests",
            "Inference requests by route and HTTP status.",
            ["model", "route", "status"],
            registry=self.registry,
        )
        self._model_id = model_id

    def watch(self, queued: Callable[[], int], generating: Callable[[], int]) -> None:
        """Gauges read at scrape time: requests waiting for a slot, and in a slot."""
        Gauge(
            "pool_worker_queue_depth",
            "Requests waiting for a generation slot.",
            ["model"],
            registry=self.registry,
        ).labels(self._model_id).set_function(queued)
        Gauge(
            "pool_worker_active_sequences",
            "Requests being generated now.",
            ["model"],
            registry=self.registry,
        ).labels(self._model_id).set_function(generating)

    def request_finished(self, route: str, status: int) -> None:
        self._requests.labels(self._model_id, route, str(status)).inc()

    def observe_generation(
        self, started: float, first_token_at: float | None, result: Finished
    ) -> None:
        now = time.perf_counter()
        self._generation_seconds.observe(now - started)
        if first_token_at is not None:
            self._ttft_seconds.observe(first_token_at - started)
        self._tokens_out.inc(result.completion_tokens)
        self._tokens_in.inc(result.prompt_tokens)
        self._tokens_cached.inc(result.cached_tokens)
        count_usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
