"""The manager's Prometheus metrics.

Counters and histograms are updated by the pool as things happen; per-model gauges
(state, in-flight, memory, TTL) are read from the pool at scrape time by a collector, so
they can never go stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pool_manager.states import ModelState

if TYPE_CHECKING:
    from pool_manager.pool import ModelPool

LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class PoolMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._loads = Counter(
            "pool_model_loads",
            "Model loads by result.",
            ["model", "result"],
            registry=self.registry,
        )
        self._load_seconds = Histogram(
            "pool_model_load_duration_seconds",
            "Time from load request to worker ready.",
            ["model"],
            registry=self.registry,
            buckets=LOAD_BUCKETS,
        )
        self._unloads = Counter(
            "pool_model_unloads",
            "Model unloads by reason.",
            ["model", "reason"],
            registry=self.registry,
        )
        self._evictions = Counter(
            "pool_model_evictions",
            "Models evicted to make room, by reason.",
            ["model", "reason"],
            registry=self.registry,
        )
        self._crashes = Counter(
            "pool_worker_crashes",
            "Workers that exited without being asked to.",
            ["model"],
            registry=self.registry,
        )
        self._requests = Counter(
            "pool_model_requests",
            "Inference requests started on a model's worker.",
            ["model"],
            registry=self.registry,
        )

        self._fallbacks = Counter(
            "pool_fallbacks",
            "Requests handed to a fallback model, by reason.",
            ["model", "fallback", "reason"],
            registry=self.registry,
        )

        self._gateway_requests = Counter(
            "pool_gateway_requests",
            "Requests through the manager's /v1 endpoint, by status.",
            ["model", "status"],
            registry=self.registry,
        )
        self._gateway_seconds = Histogram(
            "pool_gateway_response_seconds",
            "Time from a /v1 request to its response headers (includes on-demand loads).",
            ["model"],
            registry=self.registry,
            buckets=LOAD_BUCKETS,
        )

    def attach(self, pool: ModelPool) -> None:
        self.registry.register(_PoolStateCollector(pool))

    def load_finished(self, model: str, result: str, seconds: float | None) -> None:
        self._loads.labels(model, result).inc()
        if seconds is not None:
            self._load_seconds.labels(model).observe(seconds)

    def unloaded(self, model: str, reason: str) -> None:
        self._unloads.labels(model, reason).inc()

    def evicted(self, model: str, reason: str) -> None:
        self._evictions.labels(model, reason).inc()

    def crashed(self, model: str) -> None:
        self._crashes.labels(model).inc()

    def gateway_answered(self, model: str, status: int, seconds: float) -> None:
        self._gateway_requests.labels(model, str(status)).inc()
        self._gateway_seconds.labels(model).observe(seconds)

    def fell_back(self, model: str, fallback: str, reason: str) -> None:
        self._fallbacks.labels(model, fallback, reason).inc()

    def request_started(self, model: str) -> None:
        self._requests.labels(model).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolStateCollector(Collector):
    def __init__(self, pool: ModelPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        records = self._pool.records()
        by_state = GaugeMetricFamily("pool_models", "Registered models by state.", labels=["state"])
        for state in ModelState:
            by_state.add_metric([state.value], sum(r.state is state for r in records))
        yield by_state

        model_state = GaugeMetricFamily(
            "pool_model_state", "1 for the state each model is in.", labels=["model", "state"]
        )
        in_flight = GaugeMetricFamily(
            "pool_model_in_flight_requests", "Requests being served.", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "pool_model_memory_rss_bytes",
            "Resident memory of the model's worker.",
            labels=["model"],
        )
        vram = GaugeMetricFamily(
            "pool_model_vram_bytes", "GPU memory of the model's worker.", labels=["model"]
        )
        for record in records:
            model_state.add_metric([record.model_id, record.state.value], 1)
            gpu_bytes = self._pool.vram_bytes(record)
            if gpu_bytes is not None:
                vram.add_metric([record.model_id], gpu_bytes)
            in_flight.add_metric([record.model_id], record.in_flight)
            rss = self._pool.memory_rss_bytes(record)
            if rss is not None:
                memory.add_metric([record.model_id], rss)
        yield model_state
        yield in_flight
        yield memory
        yield vram
