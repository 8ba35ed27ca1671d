"""Model shapes for the planner, derived from the one description of a model: shardlm's ModelConfig.

Every model reaches the planner as a shardlm.common.config.ModelConfig: a preset of shardlm.common.presets
(the engine's `random:<name>` shapes and a few the engine does not run), a Hugging Face config.json read by
ModelConfig.from_hf(for_engine=False) (any GQA/MHA decoder, those the engine does not run included), or an
engine ModelConfig or its dict. from_engine_config turns it into the frozen ModelSpec the cost model reads:
only what it needs, the shapes of the Llama-style decoder (GQA attention, gated MLP) and, for
Mixture-of-Experts models, the expert count, top-k, expert width, shared experts and which layers stay
dense. Parameter counts are exact for these architectures (norms included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..common.config import ConfigError, ModelConfig, hf_text_config
from ..common.presets import PRESETS
from . import PlanError, read_json

LAYER_SHAPE_KEYS = ("hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "attention_bias", "qk_norm",
                    "bytes_per_param")
"""The ModelSpec fields that a decoder layer's kernels (and the LM head's) depend on: two models that
agree on them run the same kernels per layer (profile.py's model_layers)."""


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only transformer as the planner sees it."""

    name: str
    """Preset name or the path the config came from."""
    hidden: int
    """Hidden size h."""
    n_layers: int
    """Number of decoder layers L."""
    n_heads: int
    """Query heads n_h."""
    n_kv_heads: int
    """Key/value heads n_kv (GQA; equal to n_h for multi-head attention)."""
    head_dim: int
    """Per-head width d (not always h / n_h, e.g. Qwen3)."""
    ffn: int
    """Intermediate size of a dense gated MLP (gate, up, down: 3*h*f parameters)."""
    vocab: int
    """Vocabulary size V."""
    tied_embeddings: bool = False
    """LM head shares the embedding matrix."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k (Qwen3): 2*d extra parameters per layer."""
    n_experts: int = 0
    """Routed experts per MoE layer E (0 for a dense model)."""
    top_k: int = 0
    """Experts each token is routed to k."""
    expert_ffn: int = 0
    """Intermediate size of one routed expert."""
    shared_ffn: int = 0
    """Total intermediate size of the always-active shared experts of a MoE layer (0 if none)."""
    dense_layers: tuple[int, ...] = ()
    """Layer indices that keep a dense MLP in a MoE model (DeepSeek's first_k_dense_replace)."""
    max_position: int = 0
    """Longest context the model was trained for (0 if unknown)."""
    bytes_per_param: int = 2
    """Weight bytes per element as served (bf16)."""
    quantization: str | None = None
    """'fp8': the decoder's linear layers (attention, MLP, router, experts) in FP8, one byte a weight, with
    their GEMM FLOPs at cost.FP8_GEMM_TIME of bf16's; embedding, LM head (unless fp8_lm_head) and norms stay in
    bytes_per_param"""
    fp8_lm_head: bool = False
    """with quantization 'fp8': the LM head in FP8 too (one byte a weight, its own copy where tied;
    EngineArgs.fp8_lm_head)"""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """Remarks gathered while reading the config."""

    def __post_init__(self):
        if self.fp8_lm_head and self.quantization != "fp8":
            raise PlanError(f"{self.name}: fp8_lm_head puts the LM head in FP8 beside FP8 weights: set quantization "
                            f"'fp8' too, or drop fp8_lm_head")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def linear_bytes(self) -> int:
        """Bytes per weight of the decoder's linear layers."""
        return 1 if self.quantization == "fp8" else self.bytes_per_param

    @property
    def layer_shape(self) -> tuple[tuple[str, Any], ...]:
        """(field, value) of each of LAYER_SHAPE_KEYS."""
        return tuple((k, getattr(self, k)) for k in LAYER_SHAPE_KEYS)

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i not in self.dense_layers

    def moe_layers_in(self, start: int, end: int) -> int:
        """How many of layers [start, end) are MoE layers."""
        return sum(1 for i in range(start, end) if self.is_moe_layer(i))

    # -- whole-model parameter counts (one copy, no sharding) ------------------------------------

    def attn_params(self) -> int:
        """q, k, v, o projections of one layer (+ biases)."""
        p = self.hidden * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.attention_bias:
            p += (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        return p

    def norm_params(self) -> int:
        """The two RMSNorms of one layer (+ q/k norms)."""
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def expert_params(self) -> int:
        """One routed expert (gate, up, down)."""
        return 3 * self.hidden * self.expert_ffn

    def mlp_params(self, i: int, active_only: bool = False) -> int:
        """MLP of layer i: dense, or router + shared + (all | top-k) experts."""
        if not self.is_moe_layer(i):
            return 3 * self.hidden * self.ffn
        experts = self.top_k if active_only else self.n_experts
        return self.hidden * self.n_experts + 3 * self.hidden * self.shared_ffn + experts * self.expert_params()

    def embedding_params(self) -> int:
        """Embedding plus LM head (once if tied) plus the final norm."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    def total_params(self) -> int:
        per_layer = self.attn_params() + self.norm_params()
        return (self.n_layers * per_layer + sum(self.mlp_params(i) for i in range(self.n_layers))
                + self.embedding_params())

    def active_params(self) -> int:
        """Parameters one token touches (top-k experts only); equals total_params for dense models."""
        per_layer = self.attn_params() + self.norm_params()
        return (self.n_layers * per_layer + sum(self.mlp_params(i, True) for i in range(self.n_layers))
                + self.embedding_params())

    def kv_bytes_per_token(self, kv_bytes: int = 2) -> int:
        """K and V of every layer for one token, unsharded (GQA: n_kv heads, not n_h)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * kv_bytes


def from_engine_config(cfg: ModelConfig | dict[str, Any], name: str = "engine config") -> ModelSpec:
    """The planner's shapes of a model: a shardlm.common.config.ModelConfig or its to_dict().

    q/k/v biases (qkv_bias) are counted; o_proj and MLP biases (o_bias, mlp_bias) are h- and f-sized
    vectors, too small to matter, and are not."""
    if isinstance(cfg, dict):
        try:
            cfg = ModelConfig.from_dict(cfg)
        except TypeError as exc:
            raise PlanError(f"{name}: not an engine ModelConfig dict ({exc}); pass ModelConfig.to_dict() "
                            "or a Hugging Face config.json dict") from None
    if not isinstance(cfg, ModelConfig):
        raise PlanError(f"{name}: expected a shardlm ModelConfig or its dict, got {type(cfg).__name__}")
    try:
        cfg.validate()
    except ConfigError as exc:
        raise PlanError(f"{name}: {exc}") from None
    moe: dict[str, Any] = {}
    if cfg.is_moe:
        moe = dict(n_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok, expert_ffn=cfg.moe_intermediate_size,
                   shared_ffn=cfg.shared_expert_intermediate_size,
                   dense_layers=tuple(i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)))
    return ModelSpec(
        name=name, hidden=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, ffn=cfg.intermediate_size,
        vocab=cfg.vocab_size, tied_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm, max_position=cfg.max_position_embeddings, quantization=cfg.quantization,
        fp8_lm_head=cfg.fp8_lm_head, **moe)


def from_hf_config(cfg: dict[str, Any], name: str = "config.json") -> ModelSpec:
    """Read a Hugging Face config dict (Llama, Mistral, Mixtral, Qwen2/3(-MoE), DeepSeek-MoE shapes, a
    multimodal wrapper's text_config) through ModelConfig.from_hf, which reads it for the engine too; it
    need not be a model the engine runs."""
    try:
        config = ModelConfig.from_hf(cfg, name, for_engine=False)
    except ConfigError as exc:
        raise PlanError(str(exc)) from None
    spec = from_engine_config(config, name)
    text = hf_text_config(cfg)
    notes = ()
    if "tie_word_embeddings" not in text:
        notes = ("tie_word_embeddings not set: assumed untied (the Llama/Qwen default)",)
    # a context length the config leaves unset is unknown here (the engine assumes one)
    return replace(spec, max_position=spec.max_position if text.get("max_position_embeddings") else 0, notes=notes)


def model_from_dict(cfg: dict[str, Any], name: str = "model config") -> ModelSpec:
    """An engine ModelConfig dict (has the engine's own keys, e.g. qkv_bias) or a Hugging Face config dict."""
    engine_keys = {f.name for f in fields(ModelConfig)}
    if isinstance(cfg, dict) and "qkv_bias" in cfg and set(cfg) <= engine_keys:
        return from_engine_config(cfg, name)
    return from_hf_config(cfg, name)


def _known() -> str:
    return f"presets: {', '.join(sorted(PRESETS))} (each also as random:<name>)"


def load_model(spec: str | dict[str, Any]) -> ModelSpec:
    """A preset (its name in any case, or `random:<name>`), a path to config.json (or to the folder holding
    it), or a config dict (Hugging Face or the engine's ModelConfig.to_dict())."""
    if isinstance(spec, dict):
        return model_from_dict(spec)
    is_random = spec.startswith("random:")
    key = (spec.split(":", 1)[1] if is_random else spec).lower()
    if key in PRESETS:
        return from_engine_config(PRESETS[key], key)
    if is_random:
        raise PlanError(f"unknown preset {spec!r}; {_known()}")
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if path.endswith(".json") or os.path.exists(path):
        return from_hf_config(read_json(path, "config file"), path)
    raise PlanError(f"unknown model {spec!r}: give a config.json path (or its folder) or one of the {_known()}")
