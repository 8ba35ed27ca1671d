"""One description of a model: ModelConfig.from_hf reads every Hugging Face config (leniently for the planner,
checked for the engine), common.presets holds every preset, and the planner's shapes derive from both."""

import pytest

from shardlm.common.config import ConfigError, ModelConfig
from shardlm.common.model_source import ModelNotFoundError, resolve_model
from shardlm.common.presets import PRESETS, runnable_presets
from shardlm.planner import PlanError, load_model
from shardlm.planner.models import from_engine_config, from_hf_config

# the public config.json files, as far as the shapes and options go
MIXTRAL_8X7B = {
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "max_position_embeddings": 32768, "sliding_window": None, "num_local_experts": 8,
    "num_experts_per_tok": 2, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
QWEN25_72B = {
    "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
    "rope_theta": 1e6, "max_position_embeddings": 32768, "sliding_window": 131072, "use_sliding_window": False,
    "max_window_layers": 80, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
    "tie_word_embeddings": False,
}
DEEPSEEK_MOE_16B = {
    "model_type": "deepseek", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax", "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "rope_scaling": None, "max_position_embeddings": 4096, "hidden_act": "silu",
    "attention_bias": False, "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False,
}


def test_hf_configs_and_presets_are_one_description():
    assert ModelConfig.from_hf(MIXTRAL_8X7B) == PRESETS["mixtral-8x7b"]
    assert ModelConfig.from_hf(QWEN25_72B) == PRESETS["qwen2.5-72b"]
    deepseek = ModelConfig.from_hf(DEEPSEEK_MOE_16B, for_engine=False)
    assert deepseek == PRESETS["deepseek-moe-16b"]
    assert deepseek.mlp_only_layers == [0] and deepseek.shared_expert_intermediate_size == 2 * 1408
    # the planner reads the same description, and counts what the engine counts (plus q/k/v biases)
    assert from_hf_config(DEEPSEEK_MOE_16B).total_params() == load_model("deepseek-moe-16b").total_params()
    assert load_model("deepseek-moe-16b").total_params() == deepseek.num_params()
    assert load_model("random:DeepSeek-MoE-16B") == load_model("deepseek-moe-16b")  # case-insensitive
    assert ModelConfig.from_dict(deepseek.to_dict()) == deepseek


def test_deepseek_moe_layer_freq():
    cfg = ModelConfig.from_hf({**DEEPSEEK_MOE_16B, "num_hidden_layers": 8, "first_k_dense_replace": 3,
                               "moe_layer_freq": 2}, for_engine=False)
    # DeepSeek's rule: layer i has experts when i >= first_k_dense_replace and i % moe_layer_freq == 0
    assert [i for i in range(8) if cfg.is_moe_layer(i)] == [4, 6]
    assert from_engine_config(cfg).dense_layers == (0, 1, 2, 3, 5, 7)


def test_engine_runs_only_what_it_supports():
    assert "deepseek-moe-16b" in PRESETS and "deepseek-moe-16b" not in runnable_presets()
    assert {"llama-3-405b", "llama-2-70b", "qwen2.5-72b", "mixtral-8x22b", "tiny-llama"} <= set(runnable_presets())
    with pytest.raises(ConfigError, match="config.json: model_type='deepseek' is not supported; shardlm runs llama"):
        ModelConfig.from_hf(DEEPSEEK_MOE_16B)
    with pytest.raises(ModelNotFoundError, match=r"random:deepseek-moe-16b: model_type='deepseek' is not supported"
                       r".*planner only \(`shardlm plan deepseek-moe-16b`\); the engine runs .*random:tiny-llama"):
        resolve_model("random:deepseek-moe-16b")
    assert resolve_model("random:mixtral-8x22b").config == PRESETS["mixtral-8x22b"]


@pytest.mark.parametrize("patch,message", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported; shardlm supports"),
    ({"sliding_window": 4096}, "sliding_window=4096 is not supported yet; .*set sliding_window to null"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported; shardlm's experts use silu"),
])
def test_planner_reads_what_the_engine_rejects(patch, message):
    hf = {**MIXTRAL_8X7B, **patch}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf, "m/config.json")
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf, for_engine=False).check_engine_support("m")
    assert from_hf_config(hf).total_params() == load_model("mixtral-8x7b").total_params()


def test_sliding_windows():
    # a window no shorter than the context is the full context; Qwen's only counts with use_sliding_window
    assert ModelConfig.from_hf({**MIXTRAL_8X7B, "sliding_window": 32768}).sliding_window is None
    qwen3 = {**QWEN25_72B, "model_type": "qwen3", "head_dim": 128}
    assert ModelConfig.from_hf(qwen3).sliding_window is None
    with pytest.raises(ConfigError, match="use_sliding_window=true is not supported yet"):
        ModelConfig.from_hf({**qwen3, "use_sliding_window": True})


def test_wrappers_and_mla():
    wrapped = {"model_type": "llava", "text_config": {**QWEN25_72B}, "vision_config": {"hidden_size": 1024}}
    with pytest.raises(ConfigError, match="model_type='llava' is not supported"):
        ModelConfig.from_hf(wrapped)
    assert ModelConfig.from_hf(wrapped, for_engine=False) == PRESETS["qwen2.5-72b"]
    assert load_model(wrapped).total_params() == load_model("qwen2.5-72b").total_params()
    mla = {**DEEPSEEK_MOE_16B, "model_type": "deepseek_v3", "kv_lora_rank": 512}
    with pytest.raises(PlanError, match="multi-head latent attention .*kv_lora_rank"):
        from_hf_config(mla)
    with pytest.raises(ConfigError, match="model_type='deepseek_v3' is not supported"):
        ModelConfig.from_hf(mla)


def test_planner_errors_are_plan_errors():
    for bad, message in (({**DEEPSEEK_MOE_16B, "hidden_size": None}, "required field 'hidden_size' is missing"),
                         ({**DEEPSEEK_MOE_16B, "num_key_value_heads": 3}, "must be a multiple of"),
                         ({**DEEPSEEK_MOE_16B, "vocab_size": "many"}, "'vocab_size' must be an integer"),
                         ([1, 2], "expected a JSON object")):
        with pytest.raises(PlanError, match=message) as info:
            from_hf_config(bad, "ds/config.json")
        assert not isinstance(info.value, ConfigError) and "ds/config.json" in str(info.value)


def test_notes_and_unknown_context():
    hf = {k: v for k, v in MIXTRAL_8X7B.items() if k not in ("tie_word_embeddings", "max_position_embeddings")}
    spec = from_hf_config(hf)
    assert spec.notes == ("tie_word_embeddings not set: assumed untied (the Llama/Qwen default)",)
    assert spec.max_position == 0 and from_hf_config(MIXTRAL_8X7B).notes == ()
