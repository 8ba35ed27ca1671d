"""Architecture presets for `random:<name>` models: real shapes, random weights, for benchmarks and tests."""

from __future__ import annotations

from dataclasses import replace

from .config import ModelConfig

_LLAMA3_EOS = [128001, 128009]

PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_id=_LLAMA3_EOS,
    ),
    "llama-3.1-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=_LLAMA3_EOS,
    ),
    "llama-3-70b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_id=_LLAMA3_EOS,
    ),
    "smollm2-135m": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=[2],
    ),
    "mixtral-8x7b": ModelConfig(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768, bos_token_id=1, eos_token_id=[2],
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
    ),
    "qwen3-30b-a3b": ModelConfig(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960, eos_token_id=[151645],
        qk_norm=True, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    ),
    # tiny shapes for tests and quick CLI runs; the byte tokenizer needs vocab >= 259
    "tiny-llama": ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, eos_token_id=[2],
    ),
    # what `shardlm probe` runs to measure the host floor: real layer structure (GQA), tiny math
    "probe-tiny": ModelConfig(
        model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=512,
        num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=1024, eos_token_id=[2],
    ),
    "tiny-uneven": ModelConfig(
        model_type="llama", vocab_size=509, hidden_size=72, intermediate_size=150,
        num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
        max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=[2],
    ),
    "tiny-qwen2": ModelConfig(
        model_type="qwen2", vocab_size=400, hidden_size=48, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=1024, qkv_bias=True, eos_token_id=[2],
    ),
    "tiny-mixtral": ModelConfig(
        model_type="mixtral", vocab_size=512, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, eos_token_id=[2], num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=96,
    ),
    "tiny-qwen2-moe": ModelConfig(
        model_type="qwen2_moe", vocab_size=400, hidden_size=48, intermediate_size=96,
        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=1024, qkv_bias=True, eos_token_id=[2], num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64, norm_topk_prob=False, mlp_only_layers=[1],
    ),
}

# probe-tiny at 4 and 48 layers: `shardlm probe` times the step at both depths
PRESETS["probe-tiny-shallow"] = replace(PRESETS["probe-tiny"], num_hidden_layers=4)
PRESETS["probe-tiny-deep"] = replace(PRESETS["probe-tiny"], num_hidden_layers=48)


def preset(name: str) -> ModelConfig:
    """Look up a preset by name; the error lists the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())
