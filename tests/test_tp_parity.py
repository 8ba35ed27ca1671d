"""Every TP degree against Hugging Face transformers on the same weights (CPU, gloo, float32)."""

import pytest
from hf_models import PROMPTS, check_against_hf

from shardlm import LLM

TP_MODELS = ["llama-uneven-tied", "qwen2-bias-untied", "llama-allbias-mha", "mistral", "qwen3"]


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_tp_matches_hf(tp, tiny_models, hf_refs):
    for name in TP_MODELS:
        folder, _ = tiny_models[name]
        with LLM(str(folder), tensor_parallel_size=tp, block_size=8) as llm:
            check_against_hf(llm, hf_refs[name])


def test_chunked_prefill_and_preemption_match_hf(tiny_models, hf_refs):
    """A tiny token budget splits prompts into chunks; a tiny KV cache forces preemption and recompute."""
    folder, _ = tiny_models["llama-uneven-tied"]
    # 4 sequences of up to 19 + 32 tokens need 4 x 7 blocks of 8; 12 blocks force preemptions
    block_bytes = 2 * 2 * 2 * 8 * 4 * 8  # layers x (k,v) x 2 local kv heads at tp=2 x head_dim x fp32 x block
    with LLM(str(folder), tensor_parallel_size=2, block_size=8, max_num_batched_tokens=5, max_model_len=64,
             kv_cache_memory_bytes=12 * block_bytes) as llm:
        assert llm.engine.stats().blocks.num_blocks == 12
        check_against_hf(llm, hf_refs["llama-uneven-tied"])
        assert llm.engine.stats().scheduler.num_preemptions > 0
        # one long prompt alone: its first steps sample nothing, and every reply must still line up
        check_against_hf(llm, hf_refs["llama-uneven-tied"][1:2], PROMPTS[1:2])


@pytest.mark.parametrize("model, layouts", [
    ("random:tiny-llama", [dict(), dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2),
                           dict(tensor_parallel_size=3)]),
    ("random:tiny-mixtral", [dict(), dict(tensor_parallel_size=2),
                             dict(tensor_parallel_size=2, enable_expert_parallel=True)]),
])
def test_random_presets_are_one_model_at_every_layout(model, layouts):
    """random: weights are drawn per tensor and sliced, so TP, PP and EP layouts of a preset answer alike
    (float32: greedy tokens equal, first-step logits within 1e-4)"""
    import numpy as np

    from shardlm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": p} for p in ([5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, 18], [100])]
    runs = []
    for layout in layouts:
        with LLM(model, dtype="float32", **layout) as llm:
            llm.engine.return_logits = True
            outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            runs.append(([o.outputs[0].token_ids for o in outs],
                         np.stack([llm.engine.logits_log[(o.request_id, 0)][0] for o in outs])))
    for layout, (tokens, logits) in zip(layouts[1:], runs[1:]):
        assert tokens == runs[0][0], layout
        np.testing.assert_allclose(logits, runs[0][1], rtol=1e-4, atol=1e-4 * np.abs(runs[0][1]).max())
