"""Prometheus metrics under vLLM's names with a `pagedkv:` prefix, so that vLLM dashboards port by
renaming. Two sources (docs/openai_api.md has the table):

- the engine, read from its `stats` reply at each scrape: queue lengths, cache usage,
  preemptions, prefix cache queries and hits, and per KV tier below the device (host, disk) its
  hits, misses, bytes and I/O seconds; the same figures for every gateway of an engine;
- this gateway, for the requests it handles: token counters, finished requests, and the
  latency histograms (time to first token and inter-token latency of streamed requests,
  end-to-end latency and queue time of all).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no `_created` series next to each counter, as vLLM

PREFIX = "pagedkv:"
# vLLM's buckets.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]


TIER_COUNTERS = {
    "hit_blocks": "Blocks admission took from a KV tier",
    "miss_blocks": "Blocks admission looked up in a KV tier and did not find",
    "loaded_bytes": "Bytes loaded from a KV tier",
    "load_seconds": "Seconds spent loading from a KV tier (divide by its hit blocks for the latency)",
    "stored_blocks": "Blocks stored in a KV tier",
    "stored_bytes": "Bytes stored in a KV tier",
    "store_seconds": "Seconds spent storing in a KV tier",
    "evicted_blocks": "Blocks a KV tier evicted",
    "errors": "Damaged, truncated or foreign entries a KV tier found (each a miss)",
}


class EngineCollector:
    """Turns the engine's last `stats` reply into metric families when the registry is read."""

    def __init__(self) -> None:
        self.stats: dict | None = None
        self.model = ""

    def collect(self):
        s = self.stats
        if not s:
            return
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric([self.model], value)
            return family

        q, blocks = s["queues"], s["blocks"]
        yield gauge("num_requests_running", "Requests in the running queue (engine).", q["running"])
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled (engine).", q["waiting"])
        yield gauge("num_requests_swapped", "Requests swapped out to the CPU pool (engine).", q["swapped"])
        for name, pool in (("kv_cache_usage_perc", "device"), ("cpu_cache_usage_perc", "cpu")):
            total = blocks[pool]["total"]
            yield gauge(name, f"Fraction of the {pool} KV blocks in use, 0 to 1 (engine).",
                        blocks[pool]["used"] / total if total else 0.0)
        preemptions = CounterMetricFamily(PREFIX + "num_preemptions", "Preemptions since the engine started, "
                                          "by mode (engine).", labels=[*labels, "mode"])
        for mode, count in s["preemptions"].items():
            preemptions.add_metric([self.model, mode], count)
        yield preemptions
        prefix = s.get("prefix_cache")
        if isinstance(prefix, dict) and prefix.get("enabled"):
            for key, field_name in (("queries", "queried_tokens"), ("hits", "hit_tokens")):
                family = CounterMetricFamily(PREFIX + f"prefix_cache_{key}",
                                             f"Prefix cache {key}, in tokens (engine).", labels=labels)
                family.add_metric([self.model], prefix[field_name])
                yield family
        yield from self._tiers(s.get("kv_tiers") or {}, labels)

    def _tiers(self, tiers: dict, labels: list[str]):
        """The KV tiers below the device pool, one series per tier."""
        if not tiers:
            return
        for key, doc in TIER_COUNTERS.items():
            family = CounterMetricFamily(PREFIX + f"kv_tier_{key}", doc + " (engine).", labels=[*labels, "tier"])
            for tier, stats in tiers.items():
                family.add_metric([self.model, tier], stats.get(key, 0))
            yield family
        family = GaugeMetricFamily(PREFIX + "kv_tier_cached_blocks", "KV blocks a tier holds (engine).",
                                   labels=[*labels, "tier"])
        for tier, stats in tiers.items():
            family.add_metric([self.model, tier], stats.get("cached_blocks", 0))
        yield family


class RouterCollector:
    """Per engine behind a router (several --address): its state, what was routed there, and its
    own prefix cache and KV tier figures from the `stats` replies of the last scrape."""

    def __init__(self, router) -> None:
        self.router = router
        self.stats: dict[str, dict] = {}

    def collect(self):
        engines = self.router.engines
        labels = ["engine"]
        gauges = {"router_engine_healthy": ("1 while the engine is in service, 0 when taken out", lambda e: e.healthy),
                  "router_engine_load": ("Requests in flight on the engine (the larger of the gateway's and the "
                                         "engine's count)", lambda e: e.load)}
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(PREFIX + name, doc + ".", labels=labels)
            for e in engines:
                family.add_metric([e.address], float(value(e)))
            yield family
        counters = {"router_requests": ("Engine requests the router sent to the engine", lambda e: e.routed),
                    "router_prefix_hit_blocks": ("Prompt blocks the engine held (by its KV events) for the requests "
                                                 "sent there", lambda e: e.routed_prefix_blocks),
                    "router_failed_requests": ("Requests in flight on the engine when it was taken out of service "
                                               "(each ended with a 503)", lambda e: e.failed_requests),
                    "router_engine_downs": ("Times the engine was taken out of service", lambda e: e.downs)}
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(PREFIX + name, doc + ".", labels=labels)
            for e in engines:
                family.add_metric([e.address], value(e))
            yield family
        for key, field_name in (("queries", "queried_tokens"), ("hits", "hit_tokens")):
            family = CounterMetricFamily(PREFIX + f"router_engine_prefix_cache_{key}",
                                         f"Prefix cache {key}, in tokens, per engine (engine).", labels=labels)
            for address, stats in self.stats.items():
                prefix = stats.get("prefix_cache") or {}
                if prefix.get("enabled"):
                    family.add_metric([address], prefix[field_name])
            yield family
        family = CounterMetricFamily(PREFIX + "router_engine_kv_tier_hit_blocks", "Blocks admission took from a KV "
                                     "tier, per engine (engine).", labels=[*labels, "tier"])
        for address, stats in self.stats.items():
            for tier, t in (stats.get("kv_tiers") or {}).items():
                family.add_metric([address, tier], t.get("hit_blocks", 0))
        yield family


class Metrics:
    def add_router(self, router) -> None:
        self.router = RouterCollector(router)
        self.registry.register(self.router)

    async def scrape_engines(self, router, timeout: float) -> None:
        """Every engine in service's `stats`, for the per-engine families."""
        import asyncio

        healthy = [e for e in router.engines if e.healthy]
        replies = await asyncio.gather(*(e.client.stats(timeout=timeout) for e in healthy), return_exceptions=True)
        self.router.stats = {e.address: r for e, r in zip(healthy, replies) if isinstance(r, dict)}

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.engine = EngineCollector()
        self.registry.register(self.engine)
        r, model = self.registry, ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of the requests this gateway "
                                     "served.", model, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated for the requests this "
                                         "gateway served.", model, registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Requests this gateway finished, by finish "
                                       "reason.", [*model, "finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to the first token of streamed "
                              "requests, seen by this gateway.", model, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between successive token replies of "
                             "streamed requests, seen by this gateway.", model, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end latency of the requests this "
                             "gateway served.", model, buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Time requests waited before they first "
                               "ran (engine's figure, for this gateway's requests).", model,
                               buckets=LATENCY_BUCKETS, registry=r)

    def render(self, model: str, stats: dict | None) -> bytes:
        """The exposition text; engine metrics only when its `stats` reply came."""
        self.engine.model, self.engine.stats = model, stats
        try:
            return generate_latest(self.registry)
        finally:
            self.engine.stats = None


@dataclass
class RequestTimer:
    """One engine request's timings, observed when it ends."""

    metrics: Metrics
    model: str
    started: float = field(default_factory=time.perf_counter)
    last: float | None = None  # the previous token reply

    def token_reply(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.labels(self.model).observe(now - self.started)
        else:
            self.metrics.itl.labels(self.model).observe(now - self.last)
        self.last = now

    def final(self, reply: dict) -> None:
        m, model = self.metrics, self.model
        m.e2e.labels(model).observe(time.perf_counter() - self.started)
        if reply.get("queue_s") is not None:
            m.queue.labels(model).observe(reply["queue_s"])
        m.prompt_tokens.labels(model).inc(reply["prompt_tokens"])
        m.generation_tokens.labels(model).inc(sum(len(o["token_ids"]) for o in reply["outputs"]))
        reasons = [o["finish_reason"] for o in reply["outputs"]]
        m.request_success.labels(model, "length" if "length" in reasons else "stop").inc()
