"""Prometheus metrics of the HTTP service, served at /metrics.

One registry per app (tests start several apps in one process). With several worker processes each one exposes
its own numbers: scrape every replica (or the per-process port) and sum in Prometheus.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Request latencies from a cached retrieval answer (~ms) to a CPU LLM call that used its whole budget (~10 s).
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2, 4, 8, 15, 30)


class Metrics:
    """Every metric the service exports; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "shoprec_requests_total",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "shoprec_request_seconds", "HTTP request latency by route.", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.recommendations = Counter(
            "shoprec_recommendations_total", "Recommendations served by mode asked for.", ["mode"], registry=r
        )
        self.fallbacks = Counter(
            "shoprec_fallbacks_total",
            "Recommendations answered with the retrieval fallback, by cause (overload, budget, model).",
            ["cause"],
            registry=r,
        )
        self.rejected = Counter(
            "shoprec_rejected_total",
            "LLM requests refused with 429 + Retry-After past the model's capacity (overload 'reject').",
            registry=r,
        )
        self.rate_limited = Counter(
            "shoprec_rate_limited_total",
            "Requests refused with 429 by the per-key rate limit.",
            ["endpoint"],
            registry=r,
        )
        self.llm_seconds = Histogram(
            "shoprec_llm_batch_seconds",
            "Wall time of one micro-batched model call.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_batch_size = Histogram(
            "shoprec_llm_batch_size",
            "Requests per micro-batched model call.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge("shoprec_llm_queue_depth", "LLM requests waiting for the model.", registry=r)
        self.events = Counter("shoprec_events_total", "Events accepted, new vs duplicate.", ["kind"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
