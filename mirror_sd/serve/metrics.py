"""Prometheus metrics of the server, in a registry of its own (docs/serving.md lists them)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from mirror_sd.runtime.results import GenerationResult
from mirror_sd.serve.config import (
    BATCH_SIZE_BUCKETS,
    LATENCY_BUCKETS_S,
    TOKENS_PER_ROUND_BUCKETS,
)

PREFIX = "mirror_sd"
CONTENT_TYPE = CONTENT_TYPE_LATEST
MODEL_LABEL = "model"  # the label of each target's series on a server of several
# the families a request counts in before (or without) naming a target
HTTP_FAMILIES = tuple(
    f"{PREFIX}_{name}"
    for name in ("requests", "request_latency_seconds", "time_to_first_token_seconds",
                 "client_disconnects")
)  # fmt: skip


class ServeMetrics:
    """Counters and histograms the routes and the engine update; `render()` is /metrics."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests by endpoint and status code",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            f"{PREFIX}_request_latency_seconds", "Time from request to its last byte, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from request to its first generated text, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.queue_wait_s = Histogram(
            f"{PREFIX}_queue_wait_seconds", "Time a request waited for the engine",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.disconnects = Counter(
            f"{PREFIX}_client_disconnects", "Requests whose client went away before the end",
            registry=r,
        )  # fmt: skip
        # what the plan did (one observation per generation or round)
        self.generations = Counter(
            f"{PREFIX}_generations", "Generations the engine ran, by outcome",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled", registry=r
        )
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Tokens generated (rate() of it is tokens/s)", registry=r
        )
        self.tokens_per_s = Histogram(
            f"{PREFIX}_generation_tokens_per_second", "Each generation's decode rate",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=r,
        )  # fmt: skip
        self.tokens_per_round = Histogram(
            f"{PREFIX}_tokens_per_round", "Tokens each verification round committed",
            buckets=TOKENS_PER_ROUND_BUCKETS, registry=r,
        )  # fmt: skip
        self.rounds = Counter(f"{PREFIX}_rounds", "Verification rounds", registry=r)
        self.drafted = Counter(f"{PREFIX}_drafted_tokens", "Tokens the draft proposed", registry=r)
        self.accepted = Counter(
            f"{PREFIX}_accepted_draft_tokens", "Drafted tokens the target accepted", registry=r
        )
        self.branch_rounds = Counter(
            f"{PREFIX}_branch_rounds", "Mirror rounds that rolled out branches", registry=r
        )
        self.branch_hits = Counter(
            f"{PREFIX}_branch_hits", "Mirror rounds whose verdict matched a branch", registry=r
        )
        self.fallbacks = Counter(
            f"{PREFIX}_draft_fallbacks",
            "Generations whose draft failed mid-way (finished target-only)", registry=r,
        )  # fmt: skip
        self.batch_rounds = Counter(
            f"{PREFIX}_batch_rounds", "Rounds of the batched engine (one target forward each)",
            registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Sequences live in each round of the batched engine",
            buckets=BATCH_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.prefix_hits = Counter(
            f"{PREFIX}_prefix_cache_hits", "Generations whose prompt reused cached K/V rows",
            registry=r,
        )  # fmt: skip
        self.prefill_saved = Counter(
            f"{PREFIX}_prefix_cache_reused_tokens",
            "Prompt tokens not prefilled: their K/V rows came from the prefix cache", registry=r,
        )  # fmt: skip
        self.prefix_hit_rate = Gauge(
            f"{PREFIX}_prefix_cache_hit_rate", "Share of generations with a prefix-cache hit",
            registry=r,
        )  # fmt: skip
        self._served = self._hit = 0
        # the engine's state, read at scrape time (bind_engine)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting", registry=r)
        self.running = Gauge(
            f"{PREFIX}_running_requests", "Requests generating (live sequences)", registry=r
        )
        self.kv_rows = Gauge(
            f"{PREFIX}_kv_rows_in_use", "Target KV-cache rows held by running requests", registry=r
        )
        self.kv_capacity = Gauge(
            f"{PREFIX}_kv_rows_capacity", "Target KV-cache rows per sequence (max_len)", registry=r
        )
        self.draft_disabled = Gauge(
            f"{PREFIX}_draft_disabled",
            "1 while the plan does not use its draft device (a call hung, not returned yet)",
            registry=r,
        )  # fmt: skip

    def bind_engine(self, engine) -> None:
        """Read the engine's queue, running count and KV rows whenever /metrics is scraped."""
        self.queue_depth.set_function(lambda: engine.stats().queued)
        self.running.set_function(lambda: engine.stats().running)
        self.kv_rows.set_function(lambda: engine.stats().kv_rows_in_use)
        self.kv_capacity.set_function(lambda: engine.stats().kv_rows_capacity)
        self.draft_disabled.set_function(lambda: float(engine.stats().draft_disabled))

    # --- GenerationObserver (called on the engine's thread) ---------------------------------
    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_s.observe(seconds)

    def batch_round(self, live: int) -> None:
        """A round of the batched engine ran with `live` sequences."""
        self.batch_rounds.inc()
        self.batch_size.observe(live)

    def generation(self, result: GenerationResult, cancelled: bool) -> None:
        stats = result.stats
        self.generations.labels("cancelled" if cancelled else "completed").inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generated_tokens.inc(stats.new_tokens)
        if stats.wall_s > 0:
            self.tokens_per_s.observe(stats.tokens_per_s)
        for r in result.rounds:
            self.rounds.inc()
            self.tokens_per_round.observe(r.committed)
            self.drafted.inc(r.drafted)
            self.accepted.inc(min(r.accepted, r.drafted))
            if r.hit is not None:
                self.branch_rounds.inc()
                self.branch_hits.inc(int(r.hit))
        if stats.fallback:
            self.fallbacks.inc()
        self._served += 1
        if stats.prompt_rows_reused:
            self._hit += 1
            self.prefix_hits.inc()
            self.prefill_saved.inc(stats.prompt_rows_reused)
        self.prefix_hit_rate.set(self._hit / self._served)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def render_many(server: ServeMetrics, models: Mapping[str, ServeMetrics]) -> bytes:
    """/metrics of a server of several targets: every family once, each target's series
    labelled `model="<id>"`, and the server's own HTTP series (requests that named no target:
    /health, /v1/models, an unknown model, ...) without that label."""
    return generate_latest(_Merged(server, models))  # type: ignore[arg-type]


class _Merged:
    """A collector over several registries (what `generate_latest` reads)."""

    def __init__(self, server: ServeMetrics, models: Mapping[str, ServeMetrics]):
        self.server, self.models = server, models

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}

        def add(family: Metric, labels: dict[str, str]) -> None:
            out = merged.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            out.samples.extend(s._replace(labels={**labels, **s.labels}) for s in family.samples)

        for name, metrics in self.models.items():
            for family in metrics.registry.collect():
                add(family, {MODEL_LABEL: name})
        for family in self.server.registry.collect():
            if family.name in HTTP_FAMILIES:
                add(family, {})
        yield from merged.values()
