"""The start-up straggler check. Every rank timed the same one-row GEMM before its KV cache was sized
(WorkerReady.gemv_gbps, worker/probe.py); a GPU rank whose GEMV takes more than 20% longer than the median
of the other ranks' is named in the log, in /metrics and in the probe's profile (a CPU rank: 3x, as CPU ranks
share the host's cores with whatever else runs). In tensor or pipeline
parallelism every step waits for the slowest rank at each collective, so one slow GPU (a throttled clock,
a degraded HBM stack, a neighbour's job) sets the pace of the whole group; the engine's other numbers
(idle time, NCCL time) would only show it as the healthy ranks waiting.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

from ..common.messages import WorkerReady

log = logging.getLogger("shardlm.engine")

SLOWER_BY = 0.2
"""a GPU rank is a straggler when its GEMV takes more than this much longer than the other ranks' median"""
CPU_SLOWER_BY = 2.0
"""the same for CPU ranks: they share the host's cores, so any other busy process makes their timings differ
by tens of percent (a loaded 2-core host: 1.3-1.6x); only a rank 3x slower is named"""


@dataclass(frozen=True)
class RankCheck:
    rank: int
    gemv_gbps: float
    gpu_index: int | None
    device_name: str
    bus_id: str
    peers_gbps: float | None
    """the median rate of the other ranks (None with one rank)"""

    @property
    def slowdown(self) -> float:
        """how many times longer this rank's GEMV took than the other ranks' median (1.0: none to compare)"""
        return self.peers_gbps / self.gemv_gbps if self.peers_gbps and self.gemv_gbps > 0 else 1.0

    @property
    def straggler(self) -> bool:
        return self.slowdown > 1.0 + (SLOWER_BY if self.gpu_index is not None else CPU_SLOWER_BY)

    def where(self) -> str:
        """the rank as a user finds it: 'rank 1 (GPU 1, NVIDIA H200, bus 00000000:19:00.0)'"""
        if self.gpu_index is None:
            return f"rank {self.rank} ({self.device_name or 'cpu'})"
        bus = f", bus {self.bus_id}" if self.bus_id else ""
        return f"rank {self.rank} (GPU {self.gpu_index}, {self.device_name}{bus})"


def check_ranks(rates: dict[int, tuple[float, int | None, str, str]]) -> list[RankCheck]:
    """rank -> (GEMV GB/s, GPU index, device name, bus id) -> each rank's check, by rank."""
    out = []
    for rank, (gbps, gpu, name, bus) in sorted(rates.items()):
        peers = [g for r, (g, *_) in rates.items() if r != rank]
        out.append(RankCheck(rank, gbps, gpu, name, bus, statistics.median(peers) if peers else None))
    return out


def check_workers(ready: dict[int, WorkerReady]) -> list[RankCheck]:
    """The check over a worker group's ready replies; logs each straggler (a warning) and every rank's rate."""
    checks = check_ranks({r: (w.gemv_gbps, w.gpu_index, w.device_name, w.bus_id) for r, w in ready.items()})
    if len(checks) > 1:
        log.info("shardlm: start-up GEMV per rank (GB/s): %s",
                 ", ".join(f"{c.rank}: {c.gemv_gbps:,.0f}" for c in checks))
    for c in checks:
        if c.straggler:
            advice = ("Check its clocks and temperature (nvidia-smi -q -d CLOCK,PERFORMANCE), or leave it out "
                      "(CUDA_VISIBLE_DEVICES)." if c.gpu_index is not None else
                      "CPU ranks share the host's cores: another busy process may be taking them.")
            log.warning("shardlm: %s is a straggler: its start-up GEMV read %s GB/s against %s GB/s on the other "
                        "ranks (median), %.2fx as long; every step of its group waits for it at each collective. %s",
                        c.where(), f"{c.gemv_gbps:,.0f}", f"{c.peers_gbps:,.0f}", c.slowdown, advice)
    return checks


def slowest_rank(profile: dict[int, dict[str, float]]) -> dict[str, float] | None:
    """From a profiled step on every rank (bench --profile-step: GPU time by kind of kernel, us): the rank
    whose own kernels (all but communication, which is where the others wait for it) took longest, with the
    other ranks' median. None with one rank, or without kernel times (the CPU)."""
    own = {int(r): p["gemm_us"] + p["attention_us"] + p["other_us"] for r, p in profile.items()}
    if len(own) < 2 or not any(own.values()):
        return None
    rank = max(own, key=own.get)
    peers = statistics.median(v for r, v in own.items() if r != rank)
    return {"rank": rank, "kernels_us": own[rank], "peers_median_us": peers,
            "ratio": own[rank] / peers if peers > 0 else 1.0}
