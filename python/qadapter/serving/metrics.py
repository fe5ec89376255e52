"""The serving engine's Prometheus metrics (``GET /metrics``), under vLLM's names with this package's
prefix, so dashboards and alerts written for vLLM read them with ``vllm:`` replaced by ``qadapter:``.

Each engine has its own registry (two engines in one process, tests among them, never mix counts).
The engine counts as it works, on its thread: tokens read and generated, requests finished by
reason, time to the first token and to the end, each decode step's time; the running and waiting
requests and the loaded adapters are read when scraped.
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
    """The counters, histograms and gauges of one engine; ``running``, ``waiting``, ``adapters`` and
    ``cached`` (the prefix cache's bytes) are read when scraped."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int], adapters: Callable[[], int],
                 cached: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()

        def gauge(name: str, help_text: str, read: Callable[[], int]) -> None:
            Gauge(PREFIX + name, help_text, registry=self.registry).set_function(read)

        def histogram(name: str, help_text: str) -> Histogram:
            return Histogram(PREFIX + name, help_text, buckets=LATENCY_BUCKETS, registry=self.registry)

        gauge("num_requests_running", "Requests in the running batch.", running)
        gauge("num_requests_waiting", "Requests queued for the running batch.", waiting)
        gauge("num_adapters_loaded", "Adapters loaded (served policies besides the base).", adapters)
        gauge("prefix_cache_bytes", "Bytes of KV cache the prefix cache holds.", cached)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of the requests taken, as their usage "
                                     "counts them (a prompt once, however many choices read it).",
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Answer tokens generated.",
                                         registry=self.registry)
        self.finished = Counter(PREFIX + "request_success", f"Requests ended, by finish reason "
                                f"({', '.join(FINISH_REASONS)}).", ["finished_reason"], registry=self.registry)
        self.prefix_cache_queries = Counter(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the "
                                            "prefix cache.", registry=self.registry)
        self.prefix_cache_hits = Counter(PREFIX + "prefix_cache_hits", "Prompt tokens found there (not read "
                                         "again).", registry=self.registry)
        self.adapter_changes = Counter(PREFIX + "adapter_changes", "Adapters loaded and unloaded while serving.",
                                       ["change"], registry=self.registry)
        for reason in FINISH_REASONS:  # a series from the start: an alert on its first increase fires
            self.finished.labels(reason)
        for change in ("load", "unload"):
            self.adapter_changes.labels(change)
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
