"""Model presets: the one registry of named model shapes, for the engine's `random:<name>` models (real
shapes, random weights, for benchmarks and tests) and for the planner (`shardlm plan <name>`). A few describe
models the engine does not run (runnable_presets() leaves them out); the planner plans them all."""

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
    "llama-3-405b": ModelConfig(  # Llama-3.1-405B
        model_type="llama", vocab_size=128256, hidden_size=16384, intermediate_size=53248,
        num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=[128001],
    ),
    "llama-2-70b": ModelConfig(
        model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=[2],
    ),
    "qwen2.5-72b": ModelConfig(  # Qwen2.5-72B-Instruct
        model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, qkv_bias=True,
        bos_token_id=151643, eos_token_id=[151645],
    ),
    "mixtral-8x22b": ModelConfig(  # Mixtral-8x22B-Instruct-v0.1 (its vocabulary of 32768)
        model_type="mixtral", vocab_size=32768, hidden_size=6144, intermediate_size=16384,
        num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=65536, bos_token_id=1, eos_token_id=[2],
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16384,
    ),
    "qwen3-30b-a3b": ModelConfig(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960, eos_token_id=[151645],
        qk_norm=True, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    ),
    # DeepSeek-MoE 16B (planner only: the engine does not run model_type "deepseek"): fine-grained experts
    # (64 routed, top-6) + 2 shared experts, the first layer dense, ordinary multi-head attention
    "deepseek-moe-16b": ModelConfig(
        model_type="deepseek", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
        bos_token_id=100000, eos_token_id=[100001], num_experts=64, num_experts_per_tok=6,
        moe_intermediate_size=1408, shared_expert_intermediate_size=2 * 1408, norm_topk_prob=False,
        mlp_only_layers=[0],
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


def runnable_presets() -> list[str]:
    """The presets the engine runs (as random:<name>), sorted; the others are for the planner only."""
    return sorted(name for name, cfg in PRESETS.items() if cfg.engine_problem() is None)


def preset(name: str) -> ModelConfig:
    """Look up a preset by name; the error lists the known ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())
