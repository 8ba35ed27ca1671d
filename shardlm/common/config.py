"""Model configuration, read from a Hugging Face config.json dict, a GGUF header or a preset."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model or engine setting that cannot work, with what to change."""


def check_output_path(option: str, path: str | os.PathLike | None) -> None:
    """Raise, before any work, if a file the run will write at its end could not be created there."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{option} {path} is a folder; name a file in it")
    if not p.parent.is_dir():
        raise ConfigError(f"{option} {path}: folder {p.parent} does not exist; create it or name another path")


SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclass
class ModelConfig:
    """Shapes and options of a Llama-family decoder, dense or mixture-of-experts (field names follow
    Hugging Face)."""

    model_type: str
    """architecture: one of SUPPORTED_ARCHS"""
    vocab_size: int
    """rows of the embedding and of the LM head"""
    hidden_size: int
    """residual stream width h"""
    intermediate_size: int
    """FFN width f of the SwiGLU MLP"""
    num_hidden_layers: int
    """decoder layers L"""
    num_attention_heads: int
    """query heads n_h"""
    num_key_value_heads: int
    """key/value heads n_kv (GQA); equals n_h for plain multi-head attention"""
    head_dim: int
    """width of one head d"""
    rms_norm_eps: float = 1e-5
    """epsilon of every RMSNorm"""
    rope_theta: float = 10000.0
    """rotary base frequency"""
    rope_scaling: dict[str, Any] | None = None
    """rotary scaling: None, {"rope_type": "linear", "factor"} or Llama-3's {"rope_type": "llama3", ...}"""
    max_position_embeddings: int = 4096
    """longest context the model was trained for"""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix (SmolLM)"""
    qkv_bias: bool = False
    """q/k/v projections carry a bias (Qwen2; Llama's attention_bias)"""
    o_bias: bool = False
    """o_proj carries a bias (Llama's attention_bias)"""
    mlp_bias: bool = False
    """gate/up/down projections carry a bias (Llama's mlp_bias)"""
    bos_token_id: int | None = None
    """begin-of-sequence token"""
    eos_token_id: list[int] = field(default_factory=list)
    """end-of-sequence tokens (several for Llama-3 instruct models)"""
    qk_norm: bool = False
    """RMSNorm over each query and key head before rotary (Qwen3: q_norm, k_norm)"""
    num_experts: int = 0
    """routed experts per MoE layer E (0: a dense model)"""
    num_experts_per_tok: int = 0
    """experts each token is routed to (top-k)"""
    moe_intermediate_size: int = 0
    """FFN width of one routed expert"""
    shared_expert_intermediate_size: int = 0
    """FFN width of the always-on shared expert (Qwen2-MoE; 0: none)"""
    norm_topk_prob: bool = True
    """renormalise the top-k router probabilities to sum to 1 (Mixtral: always; Qwen-MoE: config)"""
    decoder_sparse_step: int = 1
    """every decoder_sparse_step-th layer is MoE (Qwen-MoE)"""
    mlp_only_layers: list[int] = field(default_factory=list)
    """layers that keep a dense MLP of intermediate_size in an MoE model (Qwen-MoE)"""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        """Decoder layer `index` has routed experts (Hugging Face's rule for Qwen-MoE; every layer of Mixtral)."""
        return (self.is_moe and index not in self.mlp_only_layers
                and (index + 1) % max(1, self.decoder_sparse_step) == 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config.json dict; errors name the missing field and the file."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; shardlm runs "
                f"{', '.join(SUPPORTED_ARCHS)} (Llama-family decoders)"
            )

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return hf[key]

        n_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        n_kv = int(hf.get("num_key_value_heads") or n_heads)
        head_dim = int(hf.get("head_dim") or hidden // n_heads)
        # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = hf.get("rope_scaling") or rope_params or None
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            scaling["rope_type"] = rope_type
            scaling.pop("type", None)
            if rope_type == "default":
                scaling = None
            elif rope_type not in ("linear", "llama3"):
                raise ConfigError(
                    f"{source}: rope scaling {rope_type!r} is not supported; shardlm supports "
                    f"default, linear and llama3"
                )
        if model_type in ("mistral", "mixtral") and hf.get("sliding_window") not in (None, 0):
            if int(hf["sliding_window"]) < int(hf.get("max_position_embeddings", 0) or 0):
                raise ConfigError(
                    f"{source}: sliding_window={hf['sliding_window']} is not supported yet; "
                    f"shardlm attends over the full context (set sliding_window to null)"
                )
        moe: dict[str, Any] = {}
        if model_type in MOE_ARCHS:
            n_exp = hf.get("num_local_experts") or hf.get("num_experts")
            if not n_exp:
                raise ConfigError(f"{source}: required field 'num_local_experts' (or 'num_experts') is missing")
            moe = dict(num_experts=int(n_exp), num_experts_per_tok=int(need("num_experts_per_tok")),
                       moe_intermediate_size=int(hf.get("moe_intermediate_size") or need("intermediate_size")),
                       shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
                       norm_topk_prob=model_type == "mixtral" or bool(hf.get("norm_topk_prob", False)),
                       decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
                       mlp_only_layers=[int(i) for i in hf.get("mlp_only_layers") or []])
            if hf.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; shardlm's experts use silu")
        eos = hf.get("eos_token_id")
        eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        attention_bias = bool(hf.get("attention_bias", False))
        if model_type in ("qwen3", "qwen3_moe", "qwen2_moe") and hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported yet; shardlm attends over the "
                              f"full context (set use_sliding_window to false)")
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type in ("qwen2", "qwen2_moe"),
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos_list,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            **moe,
        )

    def validate(self) -> None:
        """Check the shapes agree with each other."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.is_moe:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                                  f"{self.num_experts}]: each token picks top-k of the experts")
            if self.moe_intermediate_size < 1:
                raise ConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")

    def num_params(self) -> int:
        """Parameter count (matmul weights incl. routers and every expert, embeddings, norms; biases ignored)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * h
        if self.qk_norm:
            attn += 2 * d
        moe = (self.num_experts * (3 * h * self.moe_intermediate_size + h)
               + 3 * h * self.shared_expert_intermediate_size)  # (the shared expert's 1 x h gate is ignored)
        mlps = sum(moe if self.is_moe_layer(i) else 3 * h * f for i in range(self.num_hidden_layers))
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * attn + mlps + emb + h
