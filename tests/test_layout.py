"""Pure layout arithmetic: ranks, groups, uneven splits, head assignment."""

import pytest

from shardlm.common.layout import LayoutError, ParallelLayout, shard_heads, split_evenly


def test_rank_coord_round_trip_and_order():
    lay = ParallelLayout(tp=2, pp=3, dp=2)
    assert lay.world_size == 12
    for r in range(12):
        c = lay.coord(r)
        assert lay.rank(c.dp, c.pp, c.tp) == r
    assert lay.coord(1) == lay.coord(1).__class__(dp=0, pp=0, tp=1)  # tp innermost
    assert lay.tp_groups()[0] == [0, 1]
    assert lay.pp_groups()[0] == [0, 2, 4]
    assert lay.dp_groups()[0] == [0, 6]
    assert lay.output_ranks() == [4, 10]


def test_groups_partition_the_world():
    lay = ParallelLayout(tp=3, pp=2, dp=2)
    for groups in (lay.tp_groups(), lay.pp_groups(), lay.dp_groups()):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(lay.world_size))


@pytest.mark.parametrize("bad", [dict(tp=0), dict(pp=-1), dict(dp=1.5), dict(tp=2, ep=3)])
def test_invalid_degrees(bad):
    with pytest.raises(LayoutError):
        ParallelLayout(**bad)


def test_check_world_names_the_numbers():
    with pytest.raises(LayoutError, match="needs 8 GPUs.*only 4"):
        ParallelLayout(tp=8).check_world(4, "GPUs")


def test_split_evenly():
    assert split_evenly(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(2, 3) == [(0, 1), (1, 2), (2, 2)]


def test_heads_9_over_3_kv_at_tp2_and_tp4():
    # SmolLM2: 9 query heads in 3 GQA groups of 3
    s0, s1 = (shard_heads(9, 3, 2, r) for r in range(2))
    assert (s0.q_start, s0.q_end, s0.kv_start, s0.kv_end) == (0, 5, 0, 2)
    assert (s1.q_start, s1.q_end, s1.kv_start, s1.kv_end) == (5, 9, 1, 3)  # kv head 1 on both ranks
    assert s0.kv_index == (0, 0, 0, 1, 1) and s1.kv_index == (0, 1, 1, 1)
    shards = [shard_heads(9, 3, 4, r) for r in range(4)]
    assert [s.n_q for s in shards] == [3, 2, 2, 2]
    assert sum(s.n_q for s in shards) == 9
    # each rank's kv heads are exactly the groups of its q heads
    for s in shards:
        assert {(s.q_start + i) // 3 for i in range(s.n_q)} == set(range(s.kv_start, s.kv_end))


def test_kv_heads_replicated_beyond_n_kv():
    shards = [shard_heads(8, 2, 8, r) for r in range(8)]
    assert all(s.n_kv == 1 for s in shards)
    assert [s.kv_start for s in shards] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_tp_larger_than_heads_is_rejected():
    with pytest.raises(LayoutError, match="exceeds num_attention_heads=9"):
        shard_heads(9, 3, 10, 0)
