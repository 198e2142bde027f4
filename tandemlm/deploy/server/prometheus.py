"""Prometheus metrics of one server (``GET /metrics``), in the names llama.cpp's and vLLM's servers use where they match."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class _LoadCollector(Collector):
    """Running and queued requests, read from the admission state at scrape time."""

    def __init__(self, load: Callable[[], tuple[int, int]]) -> None:
        self._load = load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running, queued = self._load()
        yield GaugeMetricFamily("tandem_requests_running", "Requests holding a generation slot.", value=running)
        yield GaugeMetricFamily("tandem_requests_queued", "Requests waiting for a slot.", value=queued)


ENGINE_COUNTER_HELP = {
    "prompt_tokens_prefilled": "Prompt tokens the engine actually decoded (the rest came from a cache).",
    "prompt_tokens_cached": "Prompt tokens taken from a cache (an idle or running sequence, or the prompt cache).",
    "prompt_cache_restored_tokens": "Prompt tokens restored from the prompt cache beyond the slots.",
    "spec_draft_tokens": "Tokens drafted by speculative decoding.",
    "spec_accepted_tokens": "Drafted tokens the model accepted.",
}


class _EngineCollector(Collector):
    """The served engines' own counters (summed over distinct engines), read at scrape time."""

    def __init__(self, counters: Callable[[], dict[str, int]]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, value in sorted(self._counters().items()):
            text = ENGINE_COUNTER_HELP.get(name, name.replace("_", " ") + ".")
            yield CounterMetricFamily(f"tandem_{name}", text, value=value)


class ServerMetrics:
    """Counters and histograms of one app, in a registry of its own (several apps may share a process)."""

    def __init__(
        self, load: Callable[[], tuple[int, int]], engine_counters: Callable[[], dict[str, int]] | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tandem_requests", "Requests answered, by endpoint and HTTP status.", ["endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        self.generation_tokens = Counter("tandem_generation_tokens", "Tokens generated.", registry=self.registry)
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds", "Time from admission to the first generated token.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.tpot = Histogram(
            "tandem_time_per_output_token_seconds", "Mean time per generated token after the first, per choice.",
            buckets=PER_TOKEN_BUCKETS, registry=self.registry,
        )
        self.registry.register(_LoadCollector(load))
        if engine_counters is not None:
            self.registry.register(_EngineCollector(engine_counters))

    def observe_choice(self, started: float, first_token: float | None, finished: float, tokens: int) -> None:
        """Records one finished choice's latency figures (times from ``time.perf_counter``)."""
        self.generation_tokens.inc(tokens)
        if first_token is None:
            return
        self.ttft.observe(first_token - started)
        if tokens > 1:
            self.tpot.observe((finished - first_token) / (tokens - 1))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
