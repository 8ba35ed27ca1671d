"""Scheduler and block manager driven by fake model outputs (no processes)."""

import random
from collections import defaultdict

import pytest

from shardlm.engine.sampling_params import SamplingParams
from shardlm.engine.scheduler import BlockManager, Scheduler
from shardlm.engine.sequence import Sequence


def check_blocks(sched: Scheduler) -> None:
    """Ownership invariants: refcounts are live owners; only cached, computed full blocks are shared."""
    bm, bs = sched.blocks, sched.blocks.block_size
    owners: dict[int, list[tuple[Sequence, int]]] = defaultdict(list)
    for s in list(sched.running) + list(sched.waiting):
        for i, blk in enumerate(s.blocks):
            owners[blk].append((s, i))
    assert all(bm.refcount[b] == len(owners.get(b, [])) for b in range(bm.num_blocks))
    free, evictable = set(bm.free), set(bm.evictable)
    assert len(free) == len(bm.free)
    assert not free & evictable and not (free | evictable) & set(owners)
    assert len(free) + len(evictable) + len(owners) == bm.num_blocks
    assert all(bm.hash_of[b] is None for b in free) and all(bm.hash_of[b] is not None for b in evictable)
    assert all(bm.hash_of[b] == h for h, b in bm.cached.items())
    assert len(bm.cached) == sum(h is not None for h in bm.hash_of)
    for blk, own in owners.items():
        if bm.hash_of[blk] is not None:  # cached: full and computed for every owner, never written again
            assert all((i + 1) * bs <= s.num_computed for s, i in own)
        if len(own) > 1:
            assert bm.hash_of[blk] is not None, f"block {blk} shared but not a cached full block"
            assert len({tuple(s.all_ids[:(i + 1) * bs]) for s, i in own}) == 1, "shared block, different prefixes"


def run_to_end(sched: Scheduler, seqs: list[Sequence], max_new, max_steps: int = 10_000,
               arrivals: dict[int, list[Sequence]] | None = None, abort_at: dict[int, list[Sequence]] | None = None,
               on_step=None):
    """Drive the scheduler like the engine does; the fake model emits token 7 + step count.

    A fake KV cache (kept on the scheduler across calls) records, for every slot written, the token
    prefix whose K/V it would hold; each step checks that every sequence's context reads exactly its
    own prefix and that nothing is written into a cached block. `arrivals`/`abort_at` map a step
    index to sequences added / aborted just before that step; `on_step(i)` runs after step i.
    `max_new` is an int or {seq_id: int}.
    """
    kv: dict[tuple[int, int], tuple[int, ...]] = sched.__dict__.setdefault("_fake_kv", {})
    bm, bs = sched.blocks, sched.blocks.block_size
    arrivals, abort_at = dict(arrivals or {}), dict(abort_at or {})
    limit = (lambda s: max_new) if isinstance(max_new, int) else (lambda s: max_new[s.seq_id])
    for s in seqs:
        sched.add(s)
    steps = []
    while sched.has_work() or arrivals:
        for s in arrivals.pop(len(steps), []):
            sched.add(s)
        for s in abort_at.pop(len(steps), []):
            sched.abort(s)
        check_blocks(sched)
        batch = sched.schedule()
        assert batch or not sched.has_work(), "no progress"
        steps.append(batch)
        check_blocks(sched)
        assert sum(len(b.tokens) for b in batch) <= sched.max_num_batched_tokens
        for b in batch:
            s = b.seq
            assert b.tokens, "a scheduled sequence must bring at least one token"
            assert b.start == s.num_computed
            assert len(s.blocks) >= bm.blocks_for(b.start + len(b.tokens))
            ids = s.all_ids
            for p in range(b.start):  # the context this step reads
                assert kv.get((s.blocks[p // bs], p % bs)) == tuple(ids[:p + 1]), f"seq {s.seq_id} reads bad K/V at {p}"
        for b in batch:  # writes (the real model writes every layer's new K/V before attending)
            s, ids = b.seq, b.seq.all_ids
            for p in range(b.start, b.start + len(b.tokens)):
                blk = s.blocks[p // bs]
                assert bm.refcount[blk] == 1 and bm.hash_of[blk] is None, f"write into shared/cached block {blk}"
                kv[(blk, p % bs)] = tuple(ids[:p + 1])
        for b in batch:
            b.seq.num_computed = b.start + len(b.tokens)
            if b.sample:
                b.seq.output_ids.append(7 + len(b.seq.output_ids))
                if len(b.seq.output_ids) >= limit(b.seq):
                    sched.finish(b.seq)
        if on_step:
            on_step(len(steps) - 1)
        assert len(steps) < max_steps
    check_blocks(sched)
    return steps


def make(n_prompts: list[int], params=None):
    return [Sequence(i, str(i), 0, list(range(1, n + 1)), params or SamplingParams()) for i, n in enumerate(n_prompts)]


def seq(seq_id: int, prompt: list[int]) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, list(prompt), SamplingParams())


def first_item(steps, s: Sequence):
    return next(b for batch in steps for b in batch if b.seq is s)


def test_all_sequences_batched_each_step():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=1000)
    seqs = make([3, 9, 1])
    steps = run_to_end(sched, seqs, max_new=5)
    assert len(steps[0]) == 3 and all(b.sample for b in steps[0])  # one prefill step for all
    assert len(steps) == 5  # then 4 decode steps of the whole batch
    assert all(s.output_ids == [7, 8, 9, 10, 11] for s in seqs)
    assert sched.blocks.num_free_blocks == 100


def test_chunked_prefill_respects_budget():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=5)
    seqs = make([12, 3])
    steps = run_to_end(sched, seqs, max_new=3)
    first = steps[0]
    assert [len(b.tokens) for b in first] == [5] and not first[0].sample
    assert all(s.output_ids == [7, 8, 9] for s in seqs)


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("num_blocks", [7, 8, 12])
def test_preemption_frees_blocks_and_recomputes(num_blocks, caching):
    # 4 sequences that together need more blocks than exist; 7 blocks hold exactly the longest one
    sched = Scheduler(BlockManager(num_blocks, 8, enable_prefix_caching=caching), max_num_seqs=8,
                      max_num_batched_tokens=5)
    seqs = make([3, 19, 1, 7])
    run_to_end(sched, seqs, max_new=32)
    assert sched.num_preemptions > 0
    assert all(s.output_ids == list(range(7, 39)) for s in seqs)
    assert sched.blocks.num_free_blocks == num_blocks


def test_abort_releases_blocks():
    sched = Scheduler(BlockManager(10, 4), max_num_seqs=8, max_num_batched_tokens=100)
    (s,) = make([9])
    sched.add(s)
    sched.schedule()
    assert sched.blocks.num_free_blocks == 7
    sched.abort(s)
    assert sched.blocks.num_free_blocks == 10 and not sched.has_work()


@pytest.mark.parametrize("budget", [1, 2, 3, 16])
def test_token_budget_never_exceeded(budget):
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=budget)
    seqs = make([5, 11, 2, 8, 1])
    run_to_end(sched, seqs, max_new=4)
    assert all(len(s.output_ids) == 4 for s in seqs)


# ---- prefix caching ----------------------------------------------------------------------------
SYS = list(range(100, 110))  # a 10-token "system prompt": 2 full blocks of 4 and 2 tokens more


def test_shared_system_prompt_hits_skip_cached_tokens():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100)
    bm = sched.blocks
    first = seq(0, SYS + [1, 2])
    run_to_end(sched, [first], max_new=3)
    assert bm.prefix_hits == 0 and bm.num_cached_blocks == 3  # 12 prompt tokens + 2 computed outputs
    later = [seq(i, SYS + [50 + i, 60 + i, 70 + i]) for i in range(1, 4)]
    steps = run_to_end(sched, later, max_new=3)
    for s in later:  # the 8 tokens of the 2 full system-prompt blocks come from the cache
        item = first_item(steps, s)
        assert item.start == 8 and item.tokens == s.all_ids[8:13]
        assert s.output_ids == [7, 8, 9]
    assert bm.prefix_hits == 3 * 8 and bm.prefix_queries == 12 + 3 * 13


def test_sequences_arriving_mid_run_share_blocks_in_use():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = seq(0, SYS + [1]), seq(1, SYS + [2, 3]), seq(2, SYS)
    seen = []

    def on_step(i):
        if i == 2:  # b and c joined while a decodes: all three read the same two physical blocks
            seen.append((a.blocks[:2] == b.blocks[:2] == c.blocks[:2], sched.blocks.refcount[a.blocks[0]]))

    steps = run_to_end(sched, [a], max_new={0: 6, 1: 3, 2: 3}, arrivals={2: [b, c]}, on_step=on_step)
    assert seen == [(True, 3)]
    assert first_item(steps, b).start == 8 and first_item(steps, c).start == 8  # c: capped at (10-1)//4 blocks
    assert a.output_ids == list(range(7, 13)) and b.output_ids == c.output_ids == [7, 8, 9]
    assert sched.blocks.prefix_hits == 16 and sched.blocks.num_free_blocks == 64


def test_hits_never_cover_the_last_token():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100)
    bm = sched.blocks
    run_to_end(sched, [seq(0, list(range(1, 13)))], max_new=1)  # 12 tokens: 3 full computed blocks
    assert bm.num_cached_blocks == 3
    exact, one_more, one = seq(1, list(range(1, 13))), seq(2, list(range(1, 14))), seq(3, [1])
    four = seq(4, [1, 2, 3, 4])
    steps = run_to_end(sched, [exact, one_more, one, four], max_new=2)
    assert (first_item(steps, exact).start, first_item(steps, exact).tokens) == (8, [9, 10, 11, 12])
    assert (first_item(steps, one_more).start, first_item(steps, one_more).tokens) == (12, [13])
    assert first_item(steps, one).start == 0 and first_item(steps, four).start == 0
    for s in (exact, one_more, one, four):
        assert s.output_ids == [7, 8]


def test_hit_rate_hand_worked():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100)
    bm = sched.blocks
    a = seq(0, SYS[:8] + [1, 2])  # 10 tokens; with 3 outputs: ids [S0 S1 | 1 2 7 8 | 9], 12 computed
    run_to_end(sched, [a], max_new=3)
    assert (bm.prefix_queries, bm.prefix_hits, bm.hit_rate, bm.num_cached_blocks) == (10, 0, 0.0, 3)
    b = seq(1, SYS[:8] + [3, 4, 5])  # 11 tokens: 2 blocks hit
    c = seq(2, list(a.all_ids))  # 13 tokens = a's prompt + outputs: 3 blocks hit, one of them decoded
    shifted = seq(3, SYS[4:8] + [1, 2, 7, 8, 9])  # starts with a's second block: no hit (other prefix)
    steps = run_to_end(sched, [b, c, shifted], max_new=3)
    assert [first_item(steps, s).start for s in (b, c, shifted)] == [8, 12, 0]
    assert bm.prefix_queries == 10 + 11 + 13 + 9 and bm.prefix_hits == 8 + 12
    assert bm.hit_rate == pytest.approx(20 / 43)
    # cached: a's 3 blocks, b's third [3 4 5 7], c's 4th is not full-computed, shifted's 2 blocks
    assert bm.num_cached_blocks == 3 + 1 + 2


def test_disabled_prefix_caching_has_no_hits():
    sched = Scheduler(BlockManager(64, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=100)
    bm = sched.blocks
    run_to_end(sched, [seq(0, SYS + [1, 2])], max_new=3)
    later = [seq(i, SYS + [i]) for i in range(1, 4)]
    steps = run_to_end(sched, later, max_new=3)
    assert all(first_item(steps, s).start == 0 for s in later)
    assert (bm.prefix_queries, bm.prefix_hits, bm.hit_rate, bm.num_cached_blocks) == (0, 0, 0.0, 0)
    assert len(bm.free) == 64 and not bm.evictable and sorted(bm.free) == list(range(64))


def test_eviction_is_lru_and_spares_blocks_in_use():
    sched = Scheduler(BlockManager(7, 4), max_num_seqs=8, max_num_batched_tokens=100)
    bm = sched.blocks
    pa, pb = list(range(1, 9)), list(range(21, 29))
    run_to_end(sched, [seq(0, pa)], max_new=1)  # 2 cached blocks, released tail first
    run_to_end(sched, [seq(1, pb)], max_new=1)
    assert bm.num_cached_blocks == 4 and len(bm.free) == 3 and list(bm.evictable) == [1, 0, 3, 2]
    # r runs on pb's cached blocks; then a 12-token stranger needs 3 blocks: the 2 free ones and
    # the least recently released cached one (pa's tail), never r's blocks in use
    r = seq(2, pb + [30])
    stranger = seq(3, list(range(41, 53)))
    steps = run_to_end(sched, [r], max_new={2: 4, 3: 1}, arrivals={1: [stranger]})
    assert first_item(steps, r).start == 8 and first_item(steps, stranger).start == 0
    assert r.output_ids == [7, 8, 9, 10] and stranger.output_ids == [7]
    assert bm.num_cached_blocks == 7 and not bm.free
    again = [seq(4, pa + [99]), seq(5, pb + [31])]
    steps = run_to_end(sched, again, max_new=1)
    assert [first_item(steps, s).start for s in again] == [4, 8]  # pa's head survived, its tail did not


def test_memory_pressure_evicts_instead_of_failing():
    # more distinct prompts than the cache holds: cached blocks are evicted, every request finishes
    sched = Scheduler(BlockManager(6, 4), max_num_seqs=2, max_num_batched_tokens=8)
    seqs = [seq(i, [i * 10 + k for k in range(9)]) for i in range(6)]
    run_to_end(sched, seqs, max_new=6)
    assert all(s.output_ids == list(range(7, 13)) for s in seqs)
    assert sched.blocks.num_free_blocks == 6 and sched.blocks.num_cached_blocks <= 6


@pytest.mark.parametrize("num_blocks,hit", [(6, 8), (7, 12)])
def test_preempted_sequence_recomputes_from_its_own_cached_blocks(num_blocks, hit):
    sched = Scheduler(BlockManager(num_blocks, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(0, list(range(1, 10))), seq(1, list(range(11, 20)))  # 9 tokens each: 3 blocks each
    steps = run_to_end(sched, [a, b], max_new=8)
    # at 13 tokens both need a 4th block: b (12 computed) is preempted and its 3 blocks cached. With
    # 6 blocks a evicts b's tail; with 7 a takes the spare one and b's third block (which holds decoded
    # tokens) survives. b comes back once a finishes and recomputes only what is not cached.
    assert sched.num_preemptions == 1 and b.num_preemptions == 1
    starts = [it.start for batch in steps for it in batch if it.seq is b]
    assert starts == [0, 9, 10, 11, hit, 13, 14, 15]
    assert sched.blocks.prefix_hits == hit and sched.blocks.prefix_queries == 9 + 9 + 13
    assert a.output_ids == b.output_ids == list(range(7, 15))


def test_abort_drops_only_its_references():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=5)
    bm = sched.blocks
    a, b, c = seq(0, SYS + [1]), seq(1, SYS + [2]), seq(2, SYS + [3, 4, 5, 6, 7, 8])
    refs = {}

    def on_step(i):
        refs[i] = bm.refcount[a.blocks[0]] if a.blocks else 0

    # a prefills in 3 chunks (steps 0-2); b joins at step 3 on a's cached blocks and runs; c joins at
    # step 4, hits the same blocks and prefills a chunk; both are aborted before step 5
    steps = run_to_end(sched, [a], max_new={0: 6, 1: 6, 2: 6}, arrivals={3: [b], 4: [c]},
                       abort_at={5: [b, c]}, on_step=on_step)
    assert first_item(steps, b).start == 8 and first_item(steps, c).start == 8 and not first_item(steps, c).sample
    assert refs[3] == 2 and refs[4] == 3 and refs[5] == 1
    assert a.output_ids == list(range(7, 13)) and len(b.output_ids) == 2 and not c.output_ids
    assert not b.blocks and not c.blocks and bm.num_free_blocks == 16 and bm.refcount == [0] * 16


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_with_shared_prefixes(seed):
    """Random arrivals, shared prefixes, tiny budgets and caches: outputs right, invariants hold."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 20))] for _ in range(3)]
    seqs, arrivals, max_new = [], defaultdict(list), {}
    for i in range(10):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 8))]
        seqs.append(seq(i, prompt))
        arrivals[rng.randrange(0, 30)].append(seqs[-1])
        max_new[i] = rng.randrange(1, 12)
    longest = max(len(s.prompt_ids) + max_new[s.seq_id] for s in seqs)
    sched = Scheduler(BlockManager(-(-longest // bs) + rng.randrange(0, 12), bs), max_num_seqs=rng.randrange(1, 6),
                      max_num_batched_tokens=rng.randrange(1, 24))
    run_to_end(sched, [], max_new=max_new, arrivals=arrivals)
    assert all(s.output_ids == list(range(7, 7 + max_new[s.seq_id])) for s in seqs)
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


def test_no_self_preemption_while_other_batches_are_in_flight():
    """With pipeline batches in flight, a sequence that cannot grow waits instead of dropping its own KV."""
    sched = Scheduler(BlockManager(4, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make([8, 8])
    for s in (a, b):
        sched.add(s)
    for item in sched.schedule():  # both prefill: 2 blocks each, all 4 blocks used
        item.seq.num_computed = item.start + len(item.tokens)
        item.seq.output_ids.append(7)
    batch = sched.schedule(in_flight={b.seq_id})  # a needs a 3rd block; only b could give one, and b is busy
    assert batch == [] and sched.num_preemptions == 0 and len(a.blocks) == 2
    batch = sched.schedule()  # b's batch came back: now the newest (b) is preempted for a
    assert [x.seq for x in batch] == [a] and sched.num_preemptions == 1


def test_ids_slices_without_joining():
    from shardlm.engine.sampling_params import SamplingParams
    from shardlm.engine.sequence import Sequence

    seq = Sequence(0, "r", 0, [1, 2, 3], SamplingParams())
    seq.output_ids += [4, 5]
    for start, end in ((0, None), (1, 4), (3, None), (4, 5), (2, 3), (5, None)):
        assert seq.ids(start, end) == seq.all_ids[start:end]
