"""What the engine reports about itself: counters for metrics and benchmarks (`EngineStats`), and the
workers' own step accounting turned into expert-routing reports and a Chrome/Perfetto trace."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .stragglers import RankCheck


@dataclass(frozen=True)
class SchedulerStats:
    running: int
    """sequences holding KV blocks and decoding"""
    waiting: int
    """sequences queued for their (next) prefill"""
    num_preemptions: int
    """times a running sequence gave its blocks back to be recomputed later (since start)"""


@dataclass(frozen=True)
class BlockStats:
    num_blocks: int
    """KV blocks per rank"""
    usage: float
    """fraction of blocks held by live sequences"""
    prefix_queries: int
    """prompt blocks looked up in the prefix cache (since start)"""
    prefix_hits: int
    """of them, found"""


@dataclass(frozen=True)
class EngineStats:
    scheduler: SchedulerStats
    blocks: BlockStats
    generated_tokens: int
    """tokens sampled over the engine's life"""
    last_step_exec_s: float
    """the output rank's seconds inside the last finished step (forward + sampling)"""


def expert_report(stats: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Routing from every rank's stats reply: tokens per expert of every MoE layer (summed over ranks), the
    rows each rank's experts processed in each step, and each step's imbalance: max / mean of those rows
    over the expert-parallel ranks of a stage (the worst stage). 1.0 is even."""
    tokens: dict[int, list[int]] = {}
    rows: dict[int, dict[int, list[int]]] = {}  # stage -> rank -> rows per step
    for rank, st in stats.items():
        if "moe" not in st:  # a pipeline stage whose layers are all dense
            continue
        for layer, counts in st["moe"]["tokens_per_expert"].items():
            acc = tokens.setdefault(int(layer), [0] * len(counts))
            tokens[int(layer)] = [a + c for a, c in zip(acc, counts)]
        rows.setdefault(st["pp"], {})[rank] = st["moe"]["step_rows"]
    steps = min((len(r) for stage in rows.values() for r in stage.values()), default=0)
    imbalance = []
    for i in range(steps):
        worst = 1.0
        for stage in rows.values():
            per_rank = [r[len(r) - steps + i] for r in stage.values()]
            if sum(per_rank):
                worst = max(worst, max(per_rank) * len(per_rank) / sum(per_rank))
        imbalance.append(worst)
    return {"tokens_per_expert": dict(sorted(tokens.items())),
            "rows_per_rank_per_step": {r: v for stage in rows.values() for r, v in stage.items()},
            "step_imbalance": imbalance,
            "mean_imbalance": sum(imbalance) / len(imbalance) if imbalance else 1.0}


def write_trace(path: str, stats: dict[int, dict[str, Any]], other: dict[str, Any],
                checks: list[RankCheck] = ()) -> None:
    """Chrome/Perfetto trace of every rank's recorded steps (stats replies with events): one process
    track per rank, one thread track per category (compute, communication, idle). A rank's track names
    its start-up GEMV rate, and a straggler says so (engine/stragglers.py)."""
    events = []
    by_rank = {c.rank: c for c in checks}
    for rank, st in sorted(stats.items()):
        name = f"rank {rank} (pp stage {st['pp']}, tp {st['tp']})"
        if rank in by_rank:
            c = by_rank[rank]
            name += f" GEMV {c.gemv_gbps:,.0f} GB/s" + (f", STRAGGLER ({c.slowdown:.2f}x its peers)" if c.straggler else "")
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": name}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        for name, cat, start, end in st.get("events", []):
            events.append({"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": cat,
                           "ts": start * 1e6, "dur": max(0.0, end - start) * 1e6})
    other = dict(other, idle_fraction={r: st["idle_fraction"] for r, st in stats.items()},
                 gemv_gbps={c.rank: c.gemv_gbps for c in checks}, stragglers=[c.rank for c in checks if c.straggler])
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}, f)
