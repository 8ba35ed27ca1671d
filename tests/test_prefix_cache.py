"""Prefix caching end to end: outputs equal Hugging Face greedy whether a prefix's K/V was cached or computed."""

import numpy as np
import pytest
import torch
from hf_models import hf_greedy

from shardlm import LLM, SamplingParams

STEPS = 12
SYS = [3 + (37 * i) % 250 for i in range(26)]  # shared 26-token "system prompt": 3 full blocks of 8 + 2 tokens


@pytest.mark.parametrize("name,tp", [("llama-uneven-tied", 1), ("qwen2-bias-untied", 2)])
def test_second_generate_hits_cache_and_matches_hf(tiny_models, name, tp):
    folder, model = tiny_models[name]
    greedy = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
    with LLM(str(folder), tensor_parallel_size=tp, block_size=8) as llm:
        bm = llm.engine.block_manager
        llm.engine.return_logits = True

        def generate_and_check(prompts):
            llm.engine.logits_log.clear()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
            for prompt, out in zip(prompts, outs):
                hf_tokens, hf_logits = hf_greedy(model, prompt, STEPS)
                assert out.outputs[0].token_ids == hf_tokens, f"prompt of {len(prompt)} tokens differs from HF"
                ours = torch.from_numpy(np.stack(llm.engine.logits_log[(out.request_id, 0)]))
                rel = (ours - hf_logits).abs().max() / hf_logits.abs().max()
                assert rel < 1e-4, f"max relative logit error {rel:.2e}"
            return outs

        first = [SYS + [11, 12, 13], SYS + [40]]
        out1 = generate_and_check(first)
        assert bm.prefix_hits == 0  # both were admitted in the same step: nothing was computed yet
        assert bm.num_cached_blocks > 0
        second = [
            SYS + [21, 22],  # 3 blocks hit (24 tokens)
            SYS,  # 3 blocks hit: 2 tokens left to compute
            first[1],  # the same prompt again: 3 blocks (its 4th block is partial)
            first[0] + out1[0].outputs[0].token_ids[:6],  # 35 tokens: 4 blocks hit, the 4th holds decoded tokens
            SYS[8:] + [5, 6],  # starts with SYS's 2nd block, at another position and context: no hit
            SYS[:24],  # exactly 3 blocks: capped at 2 so the last token is computed
        ]
        generate_and_check(second)
        assert bm.prefix_hits == 24 + 24 + 24 + 32 + 0 + 16
        assert bm.prefix_queries == sum(map(len, first + second))
        assert 0 < bm.hit_rate < 1
