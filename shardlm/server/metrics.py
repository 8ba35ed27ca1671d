"""Prometheus metrics of the server (one registry per server, so tests can run several)."""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..engine.sequence import RequestOutput

MOE_INTERVAL_S = 5.0

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class Metrics:
    def __init__(self, model: str):
        self.registry = r = CollectorRegistry()
        lbl = {"model_name": model}
        self._labels = lbl
        self.ttft = Histogram("shardlm_time_to_first_token_seconds", "Time to first token", ["model_name"],
                              buckets=_LATENCY_BUCKETS, registry=r).labels(**lbl)
        self.tpot = Histogram("shardlm_time_per_output_token_seconds", "Mean time per output token of a request",
                              ["model_name"], buckets=_TOKEN_BUCKETS, registry=r).labels(**lbl)
        self.e2e = Histogram("shardlm_e2e_request_latency_seconds", "End-to-end request latency", ["model_name"],
                             buckets=_LATENCY_BUCKETS, registry=r).labels(**lbl)
        self.running = Gauge("shardlm_num_requests_running", "Sequences in the running batch", ["model_name", "replica"],
                             registry=r)
        self.waiting = Gauge("shardlm_num_requests_waiting", "Sequences waiting for KV blocks or prefill",
                             ["model_name", "replica"], registry=r)
        self.routed = Gauge("shardlm_replica_requests_routed", "Requests routed to each replica since start",
                            ["model_name", "replica"], registry=r)
        self.load = Gauge("shardlm_replica_load", "Requests in flight per data-parallel replica",
                          ["model_name", "replica"], registry=r)
        self.kv_usage = Gauge("shardlm_kv_cache_usage_ratio", "Fraction of KV blocks in use", ["model_name", "replica"],
                              registry=r)
        self.preemptions = Counter("shardlm_num_preemptions", "Sequences preempted (KV freed, recomputed later)",
                                   ["model_name"], registry=r).labels(**lbl)
        self.prefix_queries = Counter("shardlm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      ["model_name"], registry=r).labels(**lbl)
        self.prefix_hits = Counter("shardlm_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   ["model_name"], registry=r).labels(**lbl)
        self.generation_tokens = Counter("shardlm_generation_tokens", "Tokens generated", ["model_name"],
                                         registry=r).labels(**lbl)
        self.prompt_tokens = Counter("shardlm_prompt_tokens", "Prompt tokens received", ["model_name"],
                                     registry=r).labels(**lbl)
        self.tokens_per_s = Gauge("shardlm_generation_tokens_per_second", "Generated tokens per second, last step",
                                  ["model_name", "replica"], registry=r)
        self.requests = Counter("shardlm_requests", "Requests by how they ended", ["model_name", "finished_reason"],
                                registry=r)
        # MoE routing, read from the workers every MOE_INTERVAL_S (a round trip to every rank)
        self.moe_tokens = Counter("shardlm_moe_routed_tokens", "Tokens routed to each expert of each MoE layer",
                                  ["model_name", "layer", "expert"], registry=r)
        self.moe_imbalance = Gauge("shardlm_moe_step_imbalance",
                                   "Mean over recent steps of max / mean rows per expert-parallel rank (1 = even)",
                                   ["model_name", "replica"], registry=r)
        self._seen: dict[int, dict[str, float]] = {}

    def on_step(self, replica, outputs: list[RequestOutput]) -> None:
        """Called in a replica thread after each engine step."""
        engine, key = replica.engine, str(replica.index)
        stats = engine.stats()
        sched, blocks = stats.scheduler, stats.blocks
        lbl = dict(self._labels, replica=key)
        now = time.monotonic()
        seen = self._seen.setdefault(replica.index, {"preempt": 0, "q": 0, "h": 0, "gen": 0, "t": now})
        self.running.labels(**lbl).set(sched.running)
        self.waiting.labels(**lbl).set(sched.waiting)
        self.load.labels(**lbl).set(replica.load)
        self.routed.labels(**lbl).set(replica.submitted)
        self.kv_usage.labels(**lbl).set(blocks.usage)
        self.preemptions.inc(sched.num_preemptions - seen["preempt"])
        queries, hits = blocks.prefix_queries, blocks.prefix_hits
        self.prefix_queries.inc(queries - seen["q"])
        self.prefix_hits.inc(hits - seen["h"])
        new_tokens = stats.generated_tokens - seen["gen"]
        self.generation_tokens.inc(new_tokens)
        if now > seen["t"]:
            self.tokens_per_s.labels(**lbl).set(new_tokens / (now - seen["t"]))
        seen.update(preempt=sched.num_preemptions, q=queries, h=hits, gen=stats.generated_tokens, t=now)
        if engine.source.config.is_moe and now - seen.get("moe", 0.0) >= MOE_INTERVAL_S:
            experts = engine.expert_stats(reset=True)  # counts since the last read
            for layer, counts in experts["tokens_per_expert"].items():
                for expert, n in enumerate(counts):
                    if n:
                        self.moe_tokens.labels(**self._labels, layer=str(layer), expert=str(expert)).inc(n)
            if experts["step_imbalance"]:
                self.moe_imbalance.labels(**lbl).set(experts["mean_imbalance"])
            seen["moe"] = now

    def on_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        if m is None or m.first_token_time is None or m.finished_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        self.e2e.observe(m.finished_time - m.arrival_time)
        n = max(len(c.token_ids) for c in out.outputs)
        if n > 1:
            self.tpot.observe((m.finished_time - m.first_token_time) / (n - 1))
        for c in out.outputs:
            self.requests.labels(**self._labels, finished_reason=c.finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
