"""The real default model (SmolLM2-135M-Instruct, GGUF, dequantized) against Hugging Face's own loader."""

from pathlib import Path

import pytest
import torch

from shardlm import LLM, SamplingParams
from shardlm.common.model_source import resolve_model

QUESTIONS = ["Hi!", "Explain tensor parallelism in one sentence.",
             "Write a short poem about GPUs, the sea and the patience of engineers who wait for kernels."]


@pytest.fixture(scope="module")
def hf_reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(resolve_model("smollm2-135m").path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    refs = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        refs.append((ids, out, tok.decode(out, skip_special_tokens=True)))
    return refs


@pytest.mark.parametrize("tp", [1, 3])
def test_greedy_text_equals_hf(tp, hf_reference):
    with LLM("smollm2-135m", tensor_parallel_size=tp) as llm:
        outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], SamplingParams(max_tokens=32, temperature=0))
    assert len({len(ids) for ids, _, _ in hf_reference}) == 3  # prompts of different lengths in one batch
    for out, (ids, hf_tokens, hf_text) in zip(outs, hf_reference):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_tokens
        assert out.outputs[0].text == hf_text


def test_fp8_still_knows_the_capital_of_france():
    """the real checkpoint with its linear layers quantised to FP8 at load (TP=2): the demo's kind of answer
    survives (on the CPU the reference path: the dequantised weights)"""
    with LLM("smollm2-135m", tensor_parallel_size=2, quantization="fp8") as llm:
        (out,) = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                          SamplingParams(max_tokens=16, temperature=0))
    assert "Paris" in out.outputs[0].text, out.outputs[0].text
