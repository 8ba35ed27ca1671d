"""Prometheus metrics of the server (one registry per server, so tests can run several).

The names are vLLM's with the prefix `shardlm:` for `vllm:` (num_requests_running / _waiting,
kv_cache_usage_perc, prompt_tokens_total, generation_tokens_total, request_success_total by finished_reason,
num_preemptions_total, prefix_cache_queries_total / _hits_total, and the request histograms:
time_to_first_token, inter_token_latency, time_per_output_token, e2e_request_latency, request_queue_time,
request_prefill_time, request_decode_time, request_inference_time (seconds), request_prompt_tokens,
request_generation_tokens), so a vLLM dashboard or an autoscaling rule on waiting requests works by
changing the prefix (docs/grafana-dashboard.json is one). shardlm's own (replicas, workers, GPUs, MoE routing,
stragglers) share the prefix.

Everything but the request histograms is updated in the replica threads (the engine is not thread-safe):
on_step after each step, on_tick after steps and while idle. GPU readings come from NVML, in the process
of the server, for the GPUs its worker ranks run on; without NVML (a CPU server) those gauges are absent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..engine.sequence import RequestOutput

MOE_INTERVAL_S = 5.0
REFRESH_INTERVAL_S = 5.0
"""on_tick reads the GPUs and the workers' step accounting at most this often per replica"""

log = logging.getLogger("shardlm.serve")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def _gpu_handle(ordinal: int) -> Any:
    """NVML's handle of the GPU that CUDA numbers `ordinal` (the worker's LOCAL_RANK): NVML counts
    every GPU of the host, CUDA only those CUDA_VISIBLE_DEVICES names (by index or UUID)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return pynvml.nvmlDeviceGetHandleByIndex(ordinal)
    entry = visible.split(",")[ordinal].strip()
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    return pynvml.nvmlDeviceGetHandleByUUID(entry)


def _nvml_read(read: Callable[[Any], float], handle: Any) -> float | None:
    """One reading, None where this GPU does not support it (power on some boards, anything on MIG)."""
    try:
        return read(handle)
    except pynvml.NVMLError:
        return None


@dataclass
class _Ticks:
    """What on_tick keeps per replica."""

    last: float = float("-inf")
    """when it last refreshed the gauges"""
    stepped: bool = False
    """a step ran since the workers' step accounting was last read"""
    gpus: list[tuple[str, str, Any]] | None = None
    """(rank, NVML GPU index, handle) of each rank; found on the first refresh"""


class Metrics:
    def __init__(self, model: str):
        self.registry = r = CollectorRegistry()
        lbl = {"model_name": model}
        self._labels = lbl
        self.ttft = Histogram("shardlm:time_to_first_token_seconds", "Time to first token", ["model_name"],
                              buckets=_LATENCY_BUCKETS, registry=r).labels(**lbl)
        self.tpot = Histogram("shardlm:time_per_output_token_seconds", "Mean time per output token of a request",
                              ["model_name"], buckets=_TOKEN_BUCKETS, registry=r).labels(**lbl)
        self.e2e = Histogram("shardlm:e2e_request_latency_seconds", "End-to-end request latency", ["model_name"],
                             buckets=_LATENCY_BUCKETS, registry=r).labels(**lbl)

        def request_histogram(name: str, text: str, buckets: tuple) -> Any:
            return Histogram(name, text, ["model_name"], buckets=buckets, registry=r).labels(**lbl)

        self.itl = request_histogram("shardlm:inter_token_latency_seconds", "Time between a request's token steps",
                                     _TOKEN_BUCKETS)
        self.queue_time = request_histogram("shardlm:request_queue_time_seconds",
                                            "Arrival to the first step that ran its prompt", _LATENCY_BUCKETS)
        self.prefill_time = request_histogram("shardlm:request_prefill_time_seconds",
                                              "First prompt step to the first token", _LATENCY_BUCKETS)
        self.decode_time = request_histogram("shardlm:request_decode_time_seconds", "First token to the last",
                                             _LATENCY_BUCKETS)
        self.inference_time = request_histogram("shardlm:request_inference_time_seconds",
                                                "First prompt step to the last token", _LATENCY_BUCKETS)
        self.request_prompt = request_histogram("shardlm:request_prompt_tokens", "Prompt tokens of a finished request",
                                                _COUNT_BUCKETS)
        self.request_generation = request_histogram("shardlm:request_generation_tokens",
                                                    "Tokens a finished request generated (all its completions)",
                                                    _COUNT_BUCKETS)
        self.running = Gauge("shardlm:num_requests_running", "Sequences in the running batch", ["model_name", "replica"],
                             registry=r)
        self.waiting = Gauge("shardlm:num_requests_waiting", "Sequences waiting for KV blocks or prefill",
                             ["model_name", "replica"], registry=r)
        self.routed = Gauge("shardlm:replica_requests_routed", "Requests routed to each replica since start",
                            ["model_name", "replica"], registry=r)
        self.load = Gauge("shardlm:replica_load", "Requests in flight per data-parallel replica",
                          ["model_name", "replica"], registry=r)
        self.kv_usage = Gauge("shardlm:kv_cache_usage_perc", "Fraction of KV blocks in use", ["model_name", "replica"],
                              registry=r)
        self.preemptions = Counter("shardlm:num_preemptions", "Sequences preempted (KV freed, recomputed later)",
                                   ["model_name"], registry=r).labels(**lbl)
        self.prefix_queries = Counter("shardlm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      ["model_name"], registry=r).labels(**lbl)
        self.prefix_hits = Counter("shardlm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   ["model_name"], registry=r).labels(**lbl)
        self.generation_tokens = Counter("shardlm:generation_tokens", "Tokens generated", ["model_name"],
                                         registry=r).labels(**lbl)
        self.prompt_tokens = Counter("shardlm:prompt_tokens", "Prompt tokens received", ["model_name"],
                                     registry=r).labels(**lbl)
        self.tokens_per_s = Gauge("shardlm:generation_tokens_per_second", "Generated tokens per second, last step",
                                  ["model_name", "replica"], registry=r)
        self.requests = Counter("shardlm:request_success", "Requests by how they ended", ["model_name", "finished_reason"],
                                registry=r)
        # MoE routing, read from the workers every MOE_INTERVAL_S (a round trip to every rank)
        self.moe_tokens = Counter("shardlm:moe_routed_tokens", "Tokens routed to each expert of each MoE layer",
                                  ["model_name", "layer", "expert"], registry=r)
        self.moe_imbalance = Gauge("shardlm:moe_step_imbalance",
                                   "Mean over recent steps of max / mean rows per expert-parallel rank (1 = even)",
                                   ["model_name", "replica"], registry=r)
        # the workers' own step accounting and the GPUs they run on, read by on_tick every REFRESH_INTERVAL_S
        self.step_seconds = Gauge("shardlm:worker_step_seconds",
                                  "Mean seconds each worker rank computed per step, over the last interval",
                                  ["model_name", "replica", "rank"], registry=r)
        self.worker_steps = Counter("shardlm:worker_steps", "Steps each worker rank ran, by how: a CUDA graph "
                                    "replay or eager launches", ["model_name", "replica", "rank", "mode"], registry=r)
        gpu = ["model_name", "replica", "rank", "gpu"]
        self._gpu_gauges: list[tuple[Gauge, Callable[[Any], float]]] = [
            (Gauge("shardlm:gpu_utilization_percent", "Percent of the last sample period a kernel ran on the GPU",
                   gpu, registry=r), lambda h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
            (Gauge("shardlm:gpu_memory_used_bytes", "GPU memory in use (every process)", gpu, registry=r),
             lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).used),
            (Gauge("shardlm:gpu_memory_total_bytes", "GPU memory installed", gpu, registry=r),
             lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).total),
            (Gauge("shardlm:gpu_temperature_celsius", "GPU core temperature", gpu, registry=r),
             lambda h: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
            (Gauge("shardlm:gpu_power_watts", "GPU power draw", gpu, registry=r),
             lambda h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000),
        ]
        # worker groups replaced by the engine, and which replicas can take requests
        self.restarts = Counter("shardlm:worker_restarts", "Worker groups replaced, by cause (died, hung)",
                                ["model_name", "replica", "cause"], registry=r)
        self.ready = Gauge("shardlm:replica_ready", "1 while the replica can take requests, else 0",
                           ["model_name", "replica"], registry=r)
        # the start-up straggler check of the replica's current worker group (engine/stragglers.py)
        self.gemv_gbps = Gauge("shardlm:rank_gemv_gbps", "Weight read rate of the start-up GEMV, the same on every "
                               "rank", ["model_name", "replica", "rank", "gpu", "bus_id"], registry=r)
        self.straggler = Gauge("shardlm:rank_straggler", "1 when the rank's start-up GEMV took more than 20% "
                               "longer than the other ranks' median, else 0", ["model_name", "replica", "rank"],
                               registry=r)
        self._seen: dict[int, dict[str, float]] = {}
        self._ticks: dict[int, _Ticks] = {}
        self._nvml: bool | None = None  # NVML started (None: not tried yet)
        self._nvml_lock = threading.Lock()

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
        self._ticks_of(replica).stepped = True
        if engine.source.config.is_moe and now - seen.get("moe", 0.0) >= MOE_INTERVAL_S:
            experts = engine.expert_stats(reset=True)  # counts since the last read
            for layer, counts in experts["tokens_per_expert"].items():
                for expert, n in enumerate(counts):
                    if n:
                        self.moe_tokens.labels(**self._labels, layer=str(layer), expert=str(expert)).inc(n)
            if experts["step_imbalance"]:
                self.moe_imbalance.labels(**lbl).set(experts["mean_imbalance"])
            seen["moe"] = now

    def on_tick(self, replica) -> None:
        """Called in a replica thread, often (after steps and while idle): refreshes the GPU gauges and
        the worker step times at most every REFRESH_INTERVAL_S. The step times need a round trip to the
        workers (which drains a pipeline), so they are read only when steps ran since the last read."""
        ticks = self._ticks_of(replica)
        self.load.labels(**self._labels, replica=str(replica.index)).set(replica.load)  # falls to 0 when idle
        now = time.monotonic()
        if now - ticks.last < REFRESH_INTERVAL_S:
            return
        ticks.last = now
        key = str(replica.index)
        if ticks.gpus is None:
            ticks.gpus = self._find_gpus(replica.engine)
        for rank, gpu, handle in ticks.gpus:
            for gauge, read in self._gpu_gauges:
                value = _nvml_read(read, handle)
                if value is not None:
                    gauge.labels(**self._labels, replica=key, rank=rank, gpu=gpu).set(value)
        if ticks.stepped:
            ticks.stepped = False
            for rank, acc in replica.engine.stage_stats(reset=True).items():  # busy seconds since the last read
                if acc["steps"]:
                    self.step_seconds.labels(**self._labels, replica=key, rank=str(rank)).set(
                        acc["busy_s"] / acc["steps"])
                    steps = self.worker_steps.labels(**self._labels, replica=key, rank=str(rank), mode="graph")
                    steps.inc(acc["graph_steps"])
                    steps = self.worker_steps.labels(**self._labels, replica=key, rank=str(rank), mode="eager")
                    steps.inc(acc["steps"] - acc["graph_steps"])

    def on_restart(self, replica, cause: str) -> None:
        """A replica's engine replaced its worker group (cause: 'died', 'hung')."""
        self.restarts.labels(**self._labels, replica=str(replica.index), cause=cause).inc()

    def set_ready(self, replica, ready: bool) -> None:
        self.ready.labels(**self._labels, replica=str(replica.index)).set(1 if ready else 0)

    def on_workers(self, replica) -> None:
        """A replica's worker group started (at start-up, and each time one is replaced): its straggler check."""
        key = str(replica.index)
        for c in replica.engine.rank_checks:
            gpu = "" if c.gpu_index is None else str(c.gpu_index)
            self.gemv_gbps.labels(**self._labels, replica=key, rank=str(c.rank), gpu=gpu, bus_id=c.bus_id).set(c.gemv_gbps)
            self.straggler.labels(**self._labels, replica=key, rank=str(c.rank)).set(1 if c.straggler else 0)

    def _ticks_of(self, replica) -> _Ticks:
        return self._ticks.setdefault(replica.index, _Ticks())

    def _find_gpus(self, engine) -> list[tuple[str, str, Any]]:
        """(rank, NVML index, handle) of every rank's GPU: rank r runs on CUDA device first_device + r.
        No GPUs for CPU workers, for workers that torchrun started (maybe on other hosts), or without NVML."""
        if engine.device != "cuda" or engine.args.external_workers or not self._nvml_started():
            return []
        gpus = []
        for rank in range(engine.layout.world_size):
            try:
                handle = _gpu_handle(engine.args.first_device + rank)
                gpus.append((str(rank), str(pynvml.nvmlDeviceGetIndex(handle)), handle))
            except (pynvml.NVMLError, IndexError) as exc:
                log.warning("no GPU metrics for rank %d: %s", rank, exc)
        return gpus

    def _nvml_started(self) -> bool:
        with self._nvml_lock:  # replica threads may come here at once
            if self._nvml is None:
                try:
                    pynvml.nvmlInit()
                    self._nvml = True
                except pynvml.NVMLError as exc:
                    log.warning("no GPU metrics: NVML did not start (%s)", exc)
                    self._nvml = False
            return self._nvml

    def on_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        if m is None or m.first_token_time is None or m.finished_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        self.e2e.observe(m.finished_time - m.arrival_time)
        n = max(len(c.token_ids) for c in out.outputs)
        if n > 1:
            self.tpot.observe((m.finished_time - m.first_token_time) / (n - 1))
        for gap in m.token_gaps:
            self.itl.observe(gap)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
            self.prefill_time.observe(m.first_token_time - m.first_scheduled_time)
            self.inference_time.observe(m.finished_time - m.first_scheduled_time)
        self.decode_time.observe(m.finished_time - m.first_token_time)
        self.request_prompt.observe(len(out.prompt_token_ids))
        self.request_generation.observe(sum(len(c.token_ids) for c in out.outputs))
        for c in out.outputs:
            self.requests.labels(**self._labels, finished_reason=c.finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
