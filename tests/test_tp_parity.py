"""Every TP degree against Hugging Face transformers on the same weights (CPU, gloo, float32)."""

import numpy as np
import pytest
import torch

from hf_models import hf_greedy
from shardlm import LLM, SamplingParams

STEPS = 32
TP_MODELS = ["llama-uneven-tied", "qwen2-bias-untied", "llama-allbias-mha", "mistral"]
# different lengths in one batch, including a 1-token prompt and one longer than a KV block
PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [100],
           [3, 30, 60, 90, 120, 150, 180]]


@pytest.fixture(scope="module")
def references(tiny_models):
    return {name: [hf_greedy(model, p, STEPS) for p in PROMPTS] for name, (_, model) in tiny_models.items()}


def check_against_hf(llm: LLM, refs, prompts=PROMPTS):
    llm.engine.return_logits = True
    llm.engine.logits_log.clear()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))
    for out, (hf_tokens, hf_logits) in zip(outs, refs):
        assert len(hf_tokens) == STEPS
        assert out.outputs[0].token_ids == hf_tokens
        ours = torch.from_numpy(np.stack(llm.engine.logits_log[(out.request_id, 0)]))
        assert ours.shape == hf_logits.shape
        rel = (ours - hf_logits).abs().max() / hf_logits.abs().max()
        assert rel < 1e-4, f"max relative logit error {rel:.2e}"


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_tp_matches_hf(tp, tiny_models, references):
    for name in TP_MODELS:
        folder, _ = tiny_models[name]
        with LLM(str(folder), tensor_parallel_size=tp, block_size=8) as llm:
            check_against_hf(llm, references[name])


def test_chunked_prefill_and_preemption_match_hf(tiny_models, references):
    """A tiny token budget splits prompts into chunks; a tiny KV cache forces preemption and recompute."""
    folder, _ = tiny_models["llama-uneven-tied"]
    # 4 sequences of up to 19 + 32 tokens need 4 x 7 blocks of 8; 12 blocks force preemptions
    block_bytes = 2 * 2 * 2 * 8 * 4 * 8  # layers x (k,v) x 2 local kv heads at tp=2 x head_dim x fp32 x block
    with LLM(str(folder), tensor_parallel_size=2, block_size=8, max_num_batched_tokens=5, max_model_len=64,
             kv_cache_memory_bytes=12 * block_bytes) as llm:
        assert llm.engine.block_manager.num_blocks == 12
        check_against_hf(llm, references["llama-uneven-tied"])
        assert llm.engine.scheduler.num_preemptions > 0
        # one long prompt alone: its first steps sample nothing, and every reply must still line up
        check_against_hf(llm, references["llama-uneven-tied"][1:2], PROMPTS[1:2])
