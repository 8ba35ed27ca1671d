"""Tiny Hugging Face models with random weights, saved as checkpoint folders for parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# name -> (transformers config class, kwargs); together they cover uneven head splits, KV-head
# replication (tp > n_kv), GQA groups cut across ranks, q/k/v (and o, mlp) bias, tied and untied
# embeddings, Llama-3 rope scaling and a vocab that no TP degree divides.
TINY = {
    "llama-uneven-tied": ("LlamaConfig", dict(
        vocab_size=509, hidden_size=72, intermediate_size=150, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=8, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=10000.0)),
    "qwen2-bias-untied": ("Qwen2Config", dict(
        vocab_size=401, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, tie_word_embeddings=False, use_sliding_window=False)),
    "llama-allbias-mha": ("LlamaConfig", dict(
        vocab_size=300, hidden_size=40, intermediate_size=84, num_hidden_layers=3, num_attention_heads=5,
        num_key_value_heads=5, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    # deep enough for 4 pipeline stages (5 layers split unevenly), tied embeddings across stages
    "llama-deep-tied": ("LlamaConfig", dict(
        vocab_size=311, hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(
        vocab_size=333, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, sliding_window=None, tie_word_embeddings=False)),
    # Qwen3: q/k RMSNorm per head, explicit head_dim
    "qwen3": ("Qwen3Config", dict(
        vocab_size=277, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, head_dim=16, use_sliding_window=False, tie_word_embeddings=False)),
    # mixture of experts: Mixtral (top-2, renormalised), Qwen2-MoE (6 experts: no EP degree above 3
    # divides them; shared expert with its gate; a dense layer; no renormalisation) and Qwen3-MoE
    # (q/k norm, top-3 renormalised)
    "mixtral": ("MixtralConfig", dict(
        vocab_size=333, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
        tie_word_embeddings=False)),
    "qwen2-moe": ("Qwen2MoeConfig", dict(
        vocab_size=301, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=False, use_sliding_window=False,
        tie_word_embeddings=False)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(
        vocab_size=317, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
        norm_topk_prob=True, use_sliding_window=False, tie_word_embeddings=False)),
}


def make_tiny(name: str, folder: Path) -> torch.nn.Module:
    """Build, randomise (std 0.1 so greedy choices are well separated) and save a tiny model."""
    import transformers

    cls_name, kwargs = TINY[name]
    cfg = getattr(transformers, cls_name)(max_position_embeddings=512, initializer_range=0.1,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return model


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of every step, one prompt at a time (no padding involved)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0].float()


# the parity workload: different lengths in one batch, including a 1-token prompt and one longer than a KV block
STEPS = 32
PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [100],
           [3, 30, 60, 90, 120, 150, 180]]


def check_against_hf(llm, refs, prompts=PROMPTS):
    """Greedy tokens equal HF's and every step's logits within 1e-4 relative (float32)."""
    from shardlm import SamplingParams

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
