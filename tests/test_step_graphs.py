"""Mixed-step graphs (worker/step_graphs.py): the padded metadata a graph reads must say what the eager
step's says. On the CPU: the host side (sizes, the buffer's fields against build_metadata's); the GPU tests
(tests/test_gpu.py) run the graphs against Hugging Face and the eager engine."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shardlm.common.config import ModelConfig
from shardlm.common.layout import ParallelLayout
from shardlm.common.messages import PREV_TOKEN, SeqPlan, StepPlan
from shardlm.worker.distributed import ParallelContext
from shardlm.worker.kernels.paged_attention import HeadLayout, build_metadata
from shardlm.worker.step_graphs import MIXED_SIZES, StepGraphs

BS = 16


def graphs(max_num_seqs=8, max_tokens=2048, max_model_len=1024, async_scheduling=True):
    cfg = ModelConfig("llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=4)
    runner = SimpleNamespace(
        model=None, ctx=ParallelContext(ParallelLayout(tp=1, pp=1, ep=1), 0, torch.device("cpu"), None, (0, 1)),
        block_size=BS, max_model_len=max_model_len, heads=HeadLayout(8, 2, 4, tuple(i // 4 for i in range(8)), "cpu"),
        source=SimpleNamespace(config=cfg), dtype=torch.float32, scratch_block=99, async_scheduling=async_scheduling, moe={},
        prev_rows=lambda seqs: [2 if s.tokens == [PREV_TOKEN] else -1 for s in seqs])
    return StepGraphs(runner, max_num_seqs, max_tokens, capture=False)


def field(g, t, name, n):
    lay = g._layout(t)
    return g.index[lay[name]: lay[name] + n].tolist()


def test_a_step_runs_at_the_smallest_size_that_holds_its_tokens_and_sequences():
    g = graphs(max_num_seqs=8)
    assert g.sizes == list(MIXED_SIZES)
    step = lambda *lens: StepPlan([SeqPlan(i, [1] * n, 0, [0] * 4, True) for i, n in enumerate(lens)])
    assert g.size_for(step(10)) == 16 and g.size_for(step(16)) == 16 and g.size_for(step(17)) == 32
    assert g.size_for(step(*[1] * 8)) == 16  # 8 sequences fit 16 tokens
    assert g.size_for(step(*[1] * 9)) is None  # more sequences than max_num_seqs
    assert g.size_for(step(2049)) is None  # past the largest size: eager
    long = StepPlan([SeqPlan(0, [1], 1500, [0] * 94, True)])
    assert g.size_for(long) is None  # a context past max_model_len's table width
    assert graphs(max_tokens=100).sizes == [16, 32, 64, 128]  # no size far past the step budget


def test_the_buffer_says_what_the_eager_metadata_says():
    g = graphs()
    # a decode waiting for its token (PREV_TOKEN), a prompt chunk after a prefix hit, a short chunk, a decode
    seqs = [SeqPlan(5, [PREV_TOKEN], 40, [3, 4, 7], True),
            SeqPlan(6, list(range(30, 60)), 32, [8, 9, 10, 11], True),
            SeqPlan(7, [1, 2, 3], 0, [12], False),
            SeqPlan(8, [9], 16, [13, 14], True)]
    t = g.size_for(StepPlan(seqs))
    assert t == 64
    g._fill(t, seqs)
    ref = build_metadata([s.start for s in seqs], [len(s.tokens) for s in seqs], [s.blocks for s in seqs], BS,
                         torch.device("cpu"))
    n = 35  # real tokens; the rest is padding
    assert field(g, t, "slots", n) == ref.slot_mapping.tolist()
    assert field(g, t, "slots", t)[n:] == [99 * BS] * (t - n)  # padding writes the scratch block
    assert field(g, t, "pos", n) == [40] + list(range(32, 62)) + [0, 1, 2] + [16]
    assert field(g, t, "ids", n)[:2] == [PREV_TOKEN, 30] and field(g, t, "src", n)[:2] == [2, -1]
    assert field(g, t, "starts", 4) == [40, 32, 0, 16]
    assert field(g, t, "qstart", 9) == [0, 1, 31, 34, 35, 35, 35, 35, 35]  # empty slots start at the end
    assert field(g, t, "last", 4) == [0, 30, 34, 0]  # the sampled sequences' last tokens, in plan order
    # small tiles: one per sequence of <= 16 // 4 = 4 new tokens; large ones: 32 tokens each (128 // 4)
    small, large = g._tiles(t)
    assert field(g, t, "small_seq", small)[:4] == [0, 2, 3, -1] and set(field(g, t, "small_seq", small)[3:]) == {-1}
    assert field(g, t, "large_seq", large)[:3] == [1, -1, -1] and field(g, t, "large_q0", 1) == [0]
    tables = np.array(field(g, t, "tables", g.seqs(t) * g.width)).reshape(g.seqs(t), g.width)
    assert tables[1, :4].tolist() == [8, 9, 10, 11] and tables[4:].max() == 0


def test_split_kv_fits_the_workspace_at_every_size():
    from shardlm.worker.kernels.paged_attention import BLOCK_N, SPLIT_ROWS

    g = graphs(max_model_len=16384)
    for t in g.sizes:
        splits, split_len = g._splits(t)
        assert SPLIT_ROWS // splits >= t  # the workspace has a row per token of every part
        if splits > 1:
            assert split_len % BLOCK_N == 0 and splits * split_len >= g.max_context > (splits - 1) * split_len


@pytest.mark.parametrize("max_num_seqs", [4, 256])
def test_tile_tables_hold_any_step_of_the_size(max_num_seqs):
    """The worst cases: every sequence a small tile, or every token in large tiles with a partial each."""
    g = graphs(max_num_seqs=max_num_seqs)
    for t in g.sizes:
        small, large = g._tiles(t)
        assert small >= g.seqs(t)
        lens = [t // g.seqs(t)] * g.seqs(t)
        lens[0] += t - sum(lens)
        assert large >= sum(-(-n // g.large_q) for n in lens)


def test_a_context_too_short_for_any_size_leaves_every_step_eager():
    g = graphs(max_num_seqs=1, max_model_len=8)
    assert g.sizes == [] and g.size_for(StepPlan([SeqPlan(0, [1, 2], 0, [0], True)])) is None


@pytest.mark.parametrize("max_model_len", [100, 1024, 4096])
def test_every_size_captures_with_valid_indices(max_model_len):
    """A capture's warm-up step of T tokens: sequences no longer than the longest context (the block tables'
    width), their slots in the scratch block."""
    g = graphs(max_num_seqs=4, max_model_len=max_model_len)
    assert g.sizes and all(g.seqs(t) * g.max_context >= t for t in g.sizes)
    for t in g.sizes:
        plan = g._warm_up_plan(t)
        assert sum(len(s.tokens) for s in plan) == t and len(plan) <= g.seqs(t)
        assert all(s.context_len <= g.max_context for s in plan)
        g._fill(t, plan)
        assert set(field(g, t, "slots", t)) <= set(range(99 * BS, 100 * BS))


def test_the_planner_pads_a_step_as_the_engine_runs_it():
    """The planner's mixed-step sizes (common/graph_shapes.py mixed_size, CostModel.mixed_rows) against the
    engine's choice (StepGraphs.size_for): one prompt of any length runs at the same size, past the largest
    eagerly; a sequence longer than MIXED_MAX_CONTEXT makes the step eager in both"""
    from shardlm.common.graph_shapes import MIXED_MAX_CONTEXT, mixed_size
    from shardlm.planner import load_model, make_cluster
    from shardlm.planner.cost import CostModel

    g = graphs(max_num_seqs=256, max_model_len=2 * MIXED_MAX_CONTEXT)
    cm = CostModel(load_model("llama-3-8b"), make_cluster("h200", 1))
    for t in (1, 15, 16, 17, 300, 513, 1024, 2048, 2049, 5000):
        plan = StepPlan([SeqPlan(0, [1] * t, 0, [0] * -(-t // BS), True)])
        assert g.size_for(plan) == mixed_size(t), t
        assert cm.mixed_rows(t, t)[0] == (g.size_for(plan) or t), t
    ctx = MIXED_MAX_CONTEXT + 1
    long = StepPlan([SeqPlan(0, [1], ctx - 1, [0] * -(-ctx // BS), True), SeqPlan(1, [1] * 100, 0, [0] * 7, True)])
    assert g.size_for(long) is None and cm.mixed_rows(101, ctx) == (101, None)
