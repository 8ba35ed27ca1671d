"""Step scheduler and KV block manager (driver side).

Every step batches all live sequences: running ones decode one token, waiting ones prefill a
chunk of their prompt under a token budget. Requests can join and leave between any two steps,
which is what continuous batching needs. When KV blocks run out, the most recently arrived
running sequence is preempted: its blocks are freed and it is recomputed later, never dropped.

With prefix caching (block_manager.py), a sequence admitted from the waiting queue first takes the
longest chain of cached full blocks matching its tokens and prefills only the rest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..common.messages import PREV_TOKEN
from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence
from .stats import SchedulerStats

__all__ = ["BlockManager", "ScheduledSeq", "Scheduler"]


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: tokens [start, start + len(tokens)) of its ids."""

    seq: Sequence
    start: int
    tokens: list[int]
    sample: bool


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.released: list[int] = []
        """preempted penalized sequences since the last plan: the workers may drop their token counts (the
        sequence's history seeds them again when it resumes)"""

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        # recompute preemption: drop the KV, keep the tokens; it re-prefills prompt + output later
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed = seq.num_scheduled = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if seq.sampling.penalized:
            seq.penalty_seeded = False
            self.released.append(seq.seq_id)
        # a partly prefilled head of the queue keeps its place (and its blocks): only the head may
        # hold blocks while waiting, so the head can always finish once running sequences drain
        head_busy = bool(self.waiting) and bool(self.waiting[0].blocks)
        self.waiting.insert(1 if head_busy else 0, seq)

    def schedule(self, in_flight: set[int] | frozenset[int] = frozenset(), max_seqs: int | None = None,
                 max_tokens: int | None = None, ahead: set[int] | frozenset[int] = frozenset()) -> list[ScheduledSeq]:
        """The next batch. Running sequences whose seq_id is in `in_flight` (a pipeline stage is still
        working on their previous batch) are left out: they neither run nor get preempted. The next
        chunk of a prompt whose earlier chunk is in flight may go (stages run batches in order, so its
        K/V will be there). `max_seqs` and `max_tokens` cap the batch (pipeline micro-batches).

        `ahead` (async scheduling): sequences in flight whose batch samples their next token; each decodes
        that token in this batch as PREV_TOKEN (the workers read it from the device), at position len(seq).
        If its KV blocks cannot grow it simply waits for the batch in flight (nothing is preempted for it)."""
        cap = max_seqs or self.max_num_seqs
        budget = min(self.max_num_batched_tokens, max_tokens or self.max_num_batched_tokens)
        out: list[ScheduledSeq] = []
        # blocks the last step filled become findable by later sequences (only the head can wait with blocks)
        for seq in self.running + ([self.waiting[0]] if self.waiting and self.waiting[0].blocks else []):
            self.blocks.commit(seq)
        # 1. decode: each running sequence needs a slot for its newest token
        for seq in sorted(self.running, key=lambda s: s.seq_id):
            if seq.status is not SeqStatus.RUNNING or budget <= 0 or len(out) >= cap:
                continue
            n = len(seq)
            if seq.seq_id in in_flight:
                if seq.seq_id in ahead and self.blocks.can_grow(seq, n + 1):
                    self.blocks.grow(seq, n + 1)
                    seq.num_scheduled = n + 1
                    out.append(ScheduledSeq(seq, n, [PREV_TOKEN], True))
                    budget -= 1
                continue
            if not self.blocks.can_grow(seq, n) and not self._make_room(seq, n, in_flight):
                continue
            self.blocks.grow(seq, n)
            seq.num_scheduled = n
            out.append(ScheduledSeq(seq, seq.num_computed, seq.ids(seq.num_computed), True))
            budget -= n - seq.num_computed
        # 2. prefill waiting sequences in arrival order, chunked to the remaining token budget
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if len(out) >= cap:
                break
            # a sequence without blocks starts on the cached blocks of its prefix (empty without caching)
            prefix = self.blocks.match_prefix(seq) if not seq.blocks else []
            start = len(prefix) * self.blocks.block_size if prefix else max(seq.num_computed, seq.num_scheduled)
            remaining = len(seq) - start
            chunk = min(remaining, budget)
            end = start + chunk
            if not self.blocks.can_grow(seq, end, prefix):
                break
            if not seq.blocks:
                self.blocks.admit(seq, prefix)
            self.blocks.grow(seq, end)
            self.waiting.popleft()
            begin = max(seq.num_computed, seq.num_scheduled)
            seq.num_scheduled = end
            out.append(ScheduledSeq(seq, begin, seq.ids(begin, end), chunk == remaining))
            budget -= chunk
            if chunk == remaining:
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
            else:  # more prompt to go: stays first in line for the next step
                self.waiting.appendleft(seq)
                break
        return out

    def _make_room(self, seq: Sequence, n: int, in_flight: set[int] | frozenset[int]) -> bool:
        """Preempt the newest running sequences not in flight until `seq` can hold n tokens; whether it can
        (False if it was preempted itself, or waits for the batches in flight to free blocks)."""
        while not self.blocks.can_grow(seq, n):
            candidates = [s for s in self.running if s.seq_id not in in_flight]
            victim = max(candidates, key=lambda s: s.seq_id)
            if victim is seq and any(s.seq_id in in_flight for s in self.running):
                return False  # batches in flight may free blocks soon: wait rather than drop our own KV
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def finish(self, seq: Sequence) -> None:
        seq.status = SeqStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq)

    def rebuilt(self, blocks: BlockManager, waiting: list[Sequence]) -> Scheduler:
        """A scheduler over a new KV cache with `waiting` queued in order (after a worker group was
        replaced); the limits and the counters carry over."""
        fresh = Scheduler(blocks, self.max_num_seqs, self.max_num_batched_tokens)
        fresh.waiting.extend(waiting)
        fresh.num_preemptions = self.num_preemptions
        return fresh

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.num_preemptions)
