"""Prometheus metrics of `gptlab serve` (GET /metrics), with the names vLLM uses where they apply (`vllm:` ->
`gptlab:`), so its dashboards carry over: requests running and waiting, prompt and generation tokens, time to
first token, end-to-end latency, finished requests by reason, generation throughput; plus the HTTP requests
by route and status and their durations (as prometheus-fastapi-instrumentator, which vLLM uses, names them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from gptlab.serve.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    """One registry per server (so several apps in one process never share counts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("http_requests", "HTTP requests by method, route and status",
                                     ["method", "handler", "status"], registry=r)
        self.http_duration = Histogram("http_request_duration_seconds", "HTTP request duration (to the last byte)",
                                       ["method", "handler"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("gptlab:time_to_first_token_seconds", "Time to the first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("gptlab:e2e_request_latency_seconds",
                                             "Generation requests from arrival to their last token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_success = Counter("gptlab:request_success", "Finished choices by finish reason",
                                       ["finished_reason"], registry=r)
        self.rate_limited = Counter("gptlab:rate_limited_requests", "Requests refused by the per-key rate limit",
                                    registry=r)

    def watch(self, engine: Engine) -> None:
        """Read the engine's state at every scrape."""
        self.registry.register(_EngineCollector(engine))

    def http_request(self, method: str, handler: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, handler, str(status)).inc()
        self.http_duration.labels(method, handler).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        yield GaugeMetricFamily("gptlab:num_requests_running", "Sequences being decoded", value=stats.active)
        yield GaugeMetricFamily("gptlab:num_requests_waiting", "Sequences waiting for a decoder slot",
                                value=stats.waiting)
        yield GaugeMetricFamily("gptlab:avg_generation_throughput_toks_per_s",
                                "Generated tokens per second over the last 10 s",
                                value=self.engine.tokens_per_second())
        for name, doc, value in [("prompt_tokens", "Prompt tokens of admitted sequences", stats.prompt_tokens),
                                 ("generation_tokens", "Generated tokens", stats.generated_tokens),
                                 ("request_cancelled", "Sequences cancelled (the client went away)", stats.cancelled),
                                 ("request_failed", "Sequences ended by an error", stats.failed),
                                 ("engine_steps", "Decoder steps", stats.steps)]:
            yield CounterMetricFamily(f"gptlab:{name}", doc, value=value)
