"""A server under load, simulated step by step on the cost model: what `bench serve` measures (TTFT, TPOT
and end-to-end percentiles over requests), predicted for a list of requests (when each was sent, its prompt
and output lengths) on a layout.

The simulation follows the engine's scheduler (engine/scheduler.py) as a server runs it: each replica (data
parallel) takes the requests the server's least-loaded rule gives it; a step first decodes every running
sequence (a token each), then prefills waiting prompts in arrival order within what is left of the step's
token budget, a prompt cut where the budget ends and finished in the next steps; at most max_num_seqs run.
A request's first token comes at the end of the step that finishes its prompt, each further token at the end
of each step it decodes in. With async scheduling (the engine's default with one pipeline stage) the next
step is planned as the current one starts, so a request that arrives during a step waits for the step after
the next (unless nothing else would run: an engine with nothing in flight plans at once). A step's time:
decode only, the cost model's decode step at the batch and mean context; with prompt tokens, its prefill
step over all the step's tokens (the weights read once, decodes as one-token rows) plus the decodes'
attention (the probe's timed attention where it has one, else their KV reads at the copy rate:
cost.decode_attention_s). Not modelled: the KV cache running out (preemption), prefix caching, the
server's own per-request work (HTTP, streaming).
"""

from __future__ import annotations

import heapq
import statistics
from collections import deque
from dataclasses import dataclass

from ..common.layout import ParallelLayout
from .cost import CostModel, stage_shards

PCTS = (50, 90, 99)
"""the percentiles bench serve reports and validate compares"""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile as bench serve takes it: the nearest rank (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@dataclass(frozen=True)
class Request:
    sent_s: float
    """When it was sent, seconds from the run's start."""
    prompt: int
    """Prompt tokens."""
    output: int
    """Tokens generated (ignore_eos: as many as asked)."""


@dataclass(frozen=True)
class Served:
    """One request's predicted latencies, seconds."""

    ttft_s: float
    tpot_s: float
    e2e_s: float
    engine_ttft_s: float
    """TTFT from when the engine takes the request in: a server's engine thread adds the requests that came
    during a step once that step returns (at once when idle), so this leaves out that wait (what the
    server's own TTFT histogram measures)"""


class _Seq:
    """A request in an engine: how much of its prompt is done, the tokens it has, when its first came."""

    __slots__ = ("req", "index", "done_prompt", "generated", "first_s", "taken_s")

    def __init__(self, req: Request, index: int, taken_s: float | None):
        self.req, self.index, self.done_prompt, self.generated, self.first_s = req, index, 0, 0, 0.0
        self.taken_s = taken_s  # when the engine took it in (None: not yet, a step is under way)


class _Replica:
    """One engine: its waiting prompts, its running sequences and the step under way."""

    def __init__(self):
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.step: tuple[list[_Seq], list[tuple[_Seq, int]]] = ([], [])  # the step under way: decodes, chunks
        self.planned_s: float | None = None  # async scheduling: when the next step's plan was made (None: idle)

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)


def simulate(cm: CostModel, layout: ParallelLayout, requests: list[Request], max_num_seqs: int,
             token_budget: int, replicas: int = 1, async_scheduling: bool = False) -> list[Served]:
    """Each request's TTFT, TPOT ((E2E - TTFT) / (tokens - 1)) and E2E, in the order given, on `replicas`
    engines of `layout` (the server's data parallelism; async_scheduling: each step planned as the one before
    it starts). TTFT and E2E hold the server's own overhead where the profile measured it
    (serving_overhead_us: HTTP and streaming, a constant a request; engine_ttft_s does not)."""
    if max_num_seqs < 1 or token_budget < 1:
        raise ValueError(f"max_num_seqs and token_budget must be >= 1, got {max_num_seqs}, {token_budget}")
    shards = stage_shards(cm.model, layout)
    overhead = cm.serving_overhead_s
    step_cache: dict[tuple, float] = {}

    def step_s(decodes: int, context: float, prompt_tokens: int, prompts: int, longest: int) -> float:
        """a step's time: `decodes` decodes at `context` tokens on average, `prompts` prompt chunks of
        `prompt_tokens` tokens in all, the longest sequence `longest` tokens (a mixed step's graph: cost.py
        mixed_rows)"""
        key = (decodes, round(context, -1) if decodes else 0, prompt_tokens, prompts,  # (contexts to 10 tokens)
               cm.mixed_rows(prompt_tokens + decodes, longest) if prompt_tokens else None)
        if key not in step_cache:
            if not prompt_tokens:
                step_cache[key] = cm.decode_step(layout, shards, decodes, key[1])[0]
            else:
                t = cm.prefill_step(layout, shards, prompt_tokens + decodes, prompts=prompts + decodes,
                                    context=longest)[0]
                step_cache[key] = t + cm.decode_attention_s(layout, shards, decodes, key[1])
        return step_cache[key]

    engines = [_Replica() for _ in range(replicas)]
    order = sorted(range(len(requests)), key=lambda i: requests[i].sent_s)
    out: list[Served | None] = [None] * len(requests)
    # events: (time, kind, replica or request index); kind 0 = a step ends, 1 = a request arrives; a replica
    # without a step under way is idle, and starts one once every event of the moment is in
    events = [(requests[i].sent_s, 1, i) for i in order]
    heapq.heapify(events)
    idle = set(range(replicas))

    def plan(rep: _Replica, cutoff: float) -> tuple[list[_Seq], list[tuple[_Seq, int]]]:
        """the next step's decodes and prompt chunks, from the prompts that had arrived by `cutoff`"""
        decodes = rep.running[:token_budget]  # (never more than max_num_seqs; the budget may allow fewer)
        budget = token_budget - len(decodes)
        chunks: list[tuple[_Seq, int]] = []
        running = len(rep.running)
        for seq in rep.waiting:
            if budget <= 0 or running >= max_num_seqs or seq.req.sent_s > cutoff:
                break
            take = min(seq.req.prompt - seq.done_prompt, budget)
            chunks.append((seq, take))
            budget -= take
            if seq.done_prompt + take < seq.req.prompt:
                break  # the rest of this prompt in the next step, before anyone behind it
            running += 1
        return decodes, chunks

    def start_step(r: int, now: float) -> None:
        rep = engines[r]
        decodes, chunks = plan(rep, rep.planned_s if async_scheduling and rep.planned_s is not None else now)
        if not decodes and not chunks:
            decodes, chunks = plan(rep, now)  # (nothing planned ahead: the engine plans now)
        if not decodes and not chunks:
            idle.add(r)
            rep.planned_s = None
            return
        rep.planned_s = now
        context = statistics.mean(s.req.prompt + s.generated for s in decodes) if decodes else 0.0
        longest = max([s.req.prompt + s.generated for s in decodes] + [s.done_prompt + t for s, t in chunks])
        rep.step = (decodes, chunks)
        heapq.heappush(events, (now + step_s(len(decodes), context, sum(t for _, t in chunks), len(chunks), longest),
                                0, r))

    def end_step(r: int, now: float) -> None:
        rep = engines[r]
        for seq in rep.waiting:
            if seq.taken_s is None:
                seq.taken_s = now
        decodes, chunks = rep.step
        for seq in decodes:
            seq.generated += 1
        for seq, take in chunks:
            seq.done_prompt += take
            if seq.done_prompt == seq.req.prompt:  # its first token comes with this step
                rep.waiting.remove(seq)
                seq.generated, seq.first_s = 1, now
                rep.running.append(seq)
        for seq in [s for s in rep.running if s.generated >= s.req.output]:
            rep.running.remove(seq)
            ttft = seq.first_s - seq.req.sent_s + overhead
            e2e = now - seq.req.sent_s + overhead
            tokens = seq.req.output
            out[seq.index] = Served(ttft, (e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0, e2e,
                                    seq.first_s - seq.taken_s)
        idle.add(r)  # (its next step starts once this moment's arrivals are in)

    while events:
        now = events[0][0]
        while events and events[0][0] == now:  # everything at this moment (requests sent together) first
            _, kind, i = heapq.heappop(events)
            if kind == 0:
                end_step(i, now)
            else:
                r = min(range(replicas), key=lambda k: (engines[k].load, k))
                engines[r].waiting.append(_Seq(requests[i], i, now if r in idle else None))
        for r in sorted(idle):
            idle.discard(r)
            start_step(r, now)
    if any(s is None for s in out):
        raise RuntimeError("the serving simulation left requests unfinished")
    return out  # type: ignore[return-value]


def percentiles_ms(served: list[Served]) -> dict[str, dict[str, float]]:
    """{"ttft_ms": {"p50": .., "p90": .., "p99": ..}, "tpot_ms": {...}, "e2e_ms": {...}} as bench serve writes"""
    return {f"{key}_ms": {f"p{q}": percentile([getattr(s, f"{key}_s") * 1e3 for s in served], q) for q in PCTS}
            for key in ("ttft", "tpot", "e2e")}
