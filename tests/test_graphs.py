"""Decode graphs: the pairs they are captured for, and their padded steps against Hugging Face.

The CUDA capture itself runs on the GPU host (test_gpu.py); here the graphs' padded decode path (rows
padded into a scratch KV block, context gathered to a fixed width, the result copied out of a shared
buffer) runs eagerly on the CPU, through TP and PP, and must still match HF token for token.
"""

import numpy as np
import pytest
import torch
from hf_models import PROMPTS, STEPS

from shardlm import LLM, SamplingParams
from shardlm.common.graph_shapes import (
    GRAPH_TOKENS,
    MIN_CONTEXT,
    batch_sizes,
    context_sizes,
)


def test_batch_and_context_sizes():
    assert batch_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert batch_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert batch_sizes(1) == [1]
    assert context_sizes(64) == [64]
    assert context_sizes(MIN_CONTEXT) == [MIN_CONTEXT]
    assert context_sizes(3000) == [256, 512, 1024, 2048, 3000]


class _Runner:
    """What DecodeGraphs reads from a model runner, on the CPU, for shape_for alone."""

    def __init__(self, max_model_len, attention_backend="torch"):
        from shardlm.common.config import ModelConfig
        from shardlm.common.layout import ParallelLayout
        from shardlm.worker.distributed import ParallelContext

        cfg = ModelConfig("llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=4)
        self.source = type("Source", (), {"config": cfg})()
        self.model, self.dtype, self.max_model_len, self.block_size = None, torch.float32, max_model_len, 16
        self.attention_backend = attention_backend
        self.moe = {}
        self.ctx = ParallelContext(ParallelLayout(tp=1, pp=1, ep=1), 0, torch.device("cpu"), None, (0, 1))


def test_shape_for_picks_the_smallest_pair_and_falls_back_to_eager():
    from shardlm.worker.graphs import DecodeGraphs

    g = DecodeGraphs(_Runner(max_model_len=8192), max_num_seqs=256, max_context=4096, capture=False)
    assert all(b * c <= GRAPH_TOKENS for b, c in g.pairs)
    assert g.shape_for(1, 10) == (1, 256)
    assert g.shape_for(3, 257) == (4, 512)
    assert g.shape_for(200, 256) == (256, 256)
    assert g.shape_for(64, 4096) == (64, 4096)
    assert g.shape_for(65, 4096) is None  # 96 x 4096 gathers more than GRAPH_TOKENS
    assert g.shape_for(1, 4097) is None  # past max_seq_len_to_capture
    # the input buffer holds ids, positions and PREV_TOKEN rows of the largest batch, its count of real rows
    # and the largest block table (16-token blocks)
    assert g.index.numel() == 3 * 256 + 1 + 256 * 1024 // 16 and g.out.shape == (256, 32)
    # the torch path's default: up to 8192 positions gathered
    assert max(c for _, c in DecodeGraphs(_Runner(32768), 8, None, capture=False).pairs) == 8192


def test_the_kernels_graphs_reach_every_context():
    """The attention kernels gather nothing: their graphs go up to max_model_len at any batch, contexts 4x apart."""
    from shardlm.worker.graphs import DecodeGraphs

    g = DecodeGraphs(_Runner(32768, "triton"), max_num_seqs=256, max_context=None, capture=False)
    assert sorted({c for _, c in g.pairs}) == [256, 1024, 4096, 16384, 32768]
    assert g.shape_for(256, 32768) == (256, 32768) and g.shape_for(3, 5000) == (4, 16384)


# prompts of different lengths that stop at different steps: the batch shrinks 4 -> 3 -> 2 -> 1, so steps
# run padded (3 in a pair of 4) and exact (4, 2, 1)
MAX_TOKENS = [STEPS, 9, STEPS - 5, 20]


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=1), dict(tensor_parallel_size=2),
                                    dict(pipeline_parallel_size=2), dict(tensor_parallel_size=2, pipeline_parallel_size=2)])
def test_padded_decode_matches_hf(layout, tiny_models, hf_refs, monkeypatch):
    monkeypatch.setenv("SHARDLM_PADDED_DECODE_ON_CPU", "1")
    name = "llama-uneven-tied"
    folder, _ = tiny_models[name]
    with LLM(str(folder), block_size=8, max_model_len=64, **layout) as llm:
        llm.engine.return_logits = True
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in MAX_TOKENS])
        for out, n, (hf_tokens, hf_logits) in zip(outs, MAX_TOKENS, hf_refs[name]):
            assert out.outputs[0].token_ids == hf_tokens[:n]
            ours = torch.from_numpy(np.stack(llm.engine.logits_log[(out.request_id, 0)]))
            rel = (ours - hf_logits[:n]).abs().max() / hf_logits[:n].abs().max()
            assert rel < 1e-4, f"max relative logit error {rel:.2e}"
        # every rank ran the decode steps through the graphs' path (prefills stay eager)
        stats = llm.engine.stage_stats()
        assert all(0 < s["graph_steps"] < s["steps"] for s in stats.values()), stats
