"""Scheduler and block manager driven by fake model outputs (no processes)."""

import pytest

from shardlm.sampling_params import SamplingParams
from shardlm.scheduler import BlockManager, Scheduler
from shardlm.sequence import Sequence


def run_to_end(sched: Scheduler, seqs: list[Sequence], max_new: int, max_steps: int = 10_000):
    """Drive the scheduler like the engine does; the fake model emits token 7 + step count."""
    for s in seqs:
        sched.add(s)
    steps = []
    while sched.has_work():
        batch = sched.schedule()
        assert batch, "no progress"
        steps.append(batch)
        assert sum(len(b.tokens) for b in batch) <= sched.max_num_batched_tokens
        for b in batch:
            assert b.tokens, "a scheduled sequence must bring at least one token"
            assert b.start == b.seq.num_computed
            need = sched.blocks.blocks_for(b.start + len(b.tokens))
            assert len(b.seq.blocks) >= need
            b.seq.num_computed = b.start + len(b.tokens)
            if b.sample:
                b.seq.output_ids.append(7 + len(b.seq.output_ids))
                if len(b.seq.output_ids) >= max_new:
                    sched.finish(b.seq)
        # no block is owned twice
        owned = [blk for s in seqs for blk in s.blocks]
        assert len(owned) == len(set(owned))
        assert len(steps) < max_steps
    return steps


def make(n_prompts: list[int], params=None):
    return [Sequence(i, str(i), 0, list(range(1, n + 1)), params or SamplingParams()) for i, n in enumerate(n_prompts)]


def test_all_sequences_batched_each_step():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=1000)
    seqs = make([3, 9, 1])
    steps = run_to_end(sched, seqs, max_new=5)
    assert len(steps[0]) == 3 and all(b.sample for b in steps[0])  # one prefill step for all
    assert len(steps) == 5  # then 4 decode steps of the whole batch
    assert all(s.output_ids == [7, 8, 9, 10, 11] for s in seqs)
    assert len(sched.blocks.free) == 100


def test_chunked_prefill_respects_budget():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=5)
    seqs = make([12, 3])
    steps = run_to_end(sched, seqs, max_new=3)
    first = steps[0]
    assert [len(b.tokens) for b in first] == [5] and not first[0].sample
    assert all(s.output_ids == [7, 8, 9] for s in seqs)


@pytest.mark.parametrize("num_blocks", [7, 8, 12])
def test_preemption_frees_blocks_and_recomputes(num_blocks):
    # 4 sequences that together need more blocks than exist; 7 blocks hold exactly the longest one
    sched = Scheduler(BlockManager(num_blocks, 8), max_num_seqs=8, max_num_batched_tokens=5)
    seqs = make([3, 19, 1, 7])
    run_to_end(sched, seqs, max_new=32)
    assert sched.num_preemptions > 0
    assert all(s.output_ids == list(range(7, 39)) for s in seqs)
    assert len(sched.blocks.free) == num_blocks


def test_abort_releases_blocks():
    sched = Scheduler(BlockManager(10, 4), max_num_seqs=8, max_num_batched_tokens=100)
    (seq,) = make([9])
    sched.add(seq)
    sched.schedule()
    assert len(sched.blocks.free) == 7
    sched.abort(seq)
    assert len(sched.blocks.free) == 10 and not sched.has_work()


@pytest.mark.parametrize("budget", [1, 2, 3, 16])
def test_token_budget_never_exceeded(budget):
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=budget)
    seqs = make([5, 11, 2, 8, 1])
    run_to_end(sched, seqs, max_new=4)
    assert all(len(s.output_ids) == 4 for s in seqs)
