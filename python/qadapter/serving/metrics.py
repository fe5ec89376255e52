"""The serving engine's Prometheus metrics (``GET /metrics``), under vLLM's names with this package's
prefix, so dashboards and alerts written for vLLM read them with ``vllm:`` replaced by ``qadapter:``.

Each engine has its own registry (two engines in one process, tests among them, never mix counts).
The engine counts as it works, on its thread: tokens read and generated, requests finished by
reason, time to the first token and to the end, each decode step's time; the running and waiting
requests and the loaded adapters are read when scraped. Every engine metric carries vLLM's
``model_name`` label (the base model's name), which vLLM's dashboards select by.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "qadapter:"
# How a request can end (its finish_reason; "error": the engine failed it).
FINISH_REASONS = ("stop", "length", "cancelled", "error")
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds, from a token's time on a small model to a long answer's on a large one (vLLM's spacing).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)


class EngineMetrics:
    """The counters, histograms and gauges of one engine, each labelled ``model_name``; ``running``,
    ``waiting``, ``adapters`` and ``cached`` (the prefix cache's bytes) are read when scraped;
    ``finished`` and ``adapter_changes`` hold a series per finish reason and per change."""

    def __init__(self, model_name: str, running: Callable[[], int], waiting: Callable[[], int],
                 adapters: Callable[[], int], cached: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()

        def gauge(name: str, help_text: str, read: Callable[[], int]) -> None:
            Gauge(PREFIX + name, help_text, ["model_name"], registry=self.registry).labels(model_name).set_function(read)

        def histogram(name: str, help_text: str):
            return Histogram(PREFIX + name, help_text, ["model_name"], buckets=LATENCY_BUCKETS,
                             registry=self.registry).labels(model_name)

        def counter(name: str, help_text: str, label: str | None = None, values: tuple[str, ...] = ()):
            """The model's series, or with ``label`` one per value of ``values``, each there from the
            start (an alert on its first increase fires)."""
            metric = Counter(PREFIX + name, help_text, ["model_name", *([label] if label else [])], registry=self.registry)
            return {value: metric.labels(model_name, value) for value in values} if label else metric.labels(model_name)

        gauge("num_requests_running", "Requests in the running batch.", running)
        gauge("num_requests_waiting", "Requests queued for the running batch.", waiting)
        gauge("num_adapters_loaded", "Adapters loaded (served policies besides the base).", adapters)
        gauge("prefix_cache_bytes", "Bytes of KV cache the prefix cache holds.", cached)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests taken, as their usage counts "
                                     "them (a prompt once, however many choices read it).")
        self.generation_tokens = counter("generation_tokens", "Answer tokens generated.")
        self.finished = counter("request_success", f"Requests ended, by finish reason ({', '.join(FINISH_REASONS)}).",
                                "finished_reason", FINISH_REASONS)
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found there (not read again).")
        self.adapter_changes = counter("adapter_changes", "Adapters loaded and unloaded while serving.", "change",
                                       ("load", "unload"))
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "From a request's arrival to its first answer token.")
        self.e2e_latency = histogram("e2e_request_latency_seconds", "From a request's arrival to its end.")
        self.decode_step = histogram("decode_step_seconds", "One decode step of the running batch.")
        # vLLM's HTTP counter, its name unprefixed as vLLM's is: refused requests (4xx) and failures (5xx) too.
        self.http_requests = Counter("http_requests", "HTTP responses by route, method and status class.",
                                     ["handler", "method", "status"], registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
