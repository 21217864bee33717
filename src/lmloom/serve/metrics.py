"""Prometheus metrics of the serving engine and API, under vLLM's names so existing dashboards work.

Each `ServingMetrics` owns its own `CollectorRegistry` (never the process-global one), so several engines
or test apps in one process do not collide. Series (prometheus_client adds `_total` to counters):

    vllm:num_requests_running / vllm:num_requests_waiting   gauges
    vllm:prompt_tokens_total / vllm:generation_tokens_total  counters
    vllm:request_success_total{finished_reason}              counter
    vllm:time_to_first_token_seconds                         histogram
    vllm:inter_token_latency_seconds                         histogram (vLLM's current name)
    vllm:time_per_output_token_seconds                       histogram (the older name, same samples)
    vllm:e2e_request_latency_seconds                         histogram
    vllm:request_queue_time_seconds                          histogram
    lmloom:rejections_total{reason}                          counter (requests refused before generation)

Every vLLM series carries vLLM's `model_name` label.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "ServingMetrics"]

# vLLM's buckets (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


class ServingMetrics:
    def __init__(self, model_name: str = "lmloom"):
        self.model_name = model_name
        self.registry = registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self._running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch.", labels, registry=registry
        )
        self._waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting for a batch slot.", labels, registry=registry
        )
        self._prompt = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=registry)
        self._generation = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", labels, registry=registry
        )
        self._success = Counter(
            "vllm:request_success",
            "Finished requests, by finish reason.",
            [*labels, "finished_reason"],
            registry=registry,
        )
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self._itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=registry,
        )
        self._tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token (older name of inter_token_latency).",
            labels,
            buckets=_ITL_BUCKETS,
            registry=registry,
        )
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=registry,
        )
        self._queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Time spent waiting for a batch slot.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=registry,
        )
        self._rejections = Counter(
            "lmloom:rejections",
            "Requests refused before generation, by reason.",
            ["reason"],
            registry=registry,
        )

    # Called from the engine thread.
    def set_queue_sizes(self, running: int, waiting: int) -> None:
        self._running.labels(self.model_name).set(running)
        self._waiting.labels(self.model_name).set(waiting)

    def prompt_tokens(self, n: int) -> None:
        self._prompt.labels(self.model_name).inc(n)

    def first_token(self, ttft_s: float, queue_s: float) -> None:
        self._generation.labels(self.model_name).inc()
        self._ttft.labels(self.model_name).observe(ttft_s)
        self._queue.labels(self.model_name).observe(queue_s)

    def next_token(self, itl_s: float) -> None:
        self._generation.labels(self.model_name).inc()
        self._itl.labels(self.model_name).observe(itl_s)
        self._tpot.labels(self.model_name).observe(itl_s)

    def finished(self, finish_reason: str, e2e_s: float) -> None:
        self._success.labels(self.model_name, finish_reason).inc()
        self._e2e.labels(self.model_name).observe(e2e_s)

    # Called from the API.
    def rejected(self, reason: str) -> None:
        self._rejections.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
