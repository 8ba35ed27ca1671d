"""Model shapes for the planner: presets and Hugging Face config.json files.

Also the engine's own model descriptions (shardlm.common.config.ModelConfig, its `random:<preset>` shapes in
shardlm.common.presets), through `from_engine_config`, so the planner can describe any model the engine runs.

Only what the cost model needs: shapes of the Llama-style decoder (GQA attention, gated MLP) and,
for Mixture-of-Experts models, the expert count, top-k, expert width, shared experts and which
layers stay dense. Parameter counts are exact for these architectures (norms included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

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
    notes: tuple[str, ...] = field(default=(), compare=False)
    """Remarks gathered while reading the config."""

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

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


def _llama(name: str, h: int, L: int, nh: int, nkv: int, f: int, V: int, **kw: Any) -> ModelSpec:
    return ModelSpec(name=name, hidden=h, n_layers=L, n_heads=nh, n_kv_heads=nkv,
                     head_dim=kw.pop("head_dim", h // nh), ffn=f, vocab=V, **kw)


PRESETS: dict[str, ModelSpec] = {
    "smollm2-135m": _llama("smollm2-135m", 576, 30, 9, 3, 1536, 49152, tied_embeddings=True, max_position=8192),
    "llama-3-8b": _llama("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, max_position=8192),
    "llama-3-70b": _llama("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, max_position=8192),
    "llama-3-405b": _llama("llama-3-405b", 16384, 126, 128, 8, 53248, 128256, max_position=131072),
    "llama-2-70b": _llama("llama-2-70b", 8192, 80, 64, 8, 28672, 32000, max_position=4096),
    "qwen2.5-72b": _llama("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, attention_bias=True,
                          max_position=32768),
    "mixtral-8x7b": _llama("mixtral-8x7b", 4096, 32, 32, 8, 14336, 32000, n_experts=8, top_k=2,
                           expert_ffn=14336, max_position=32768),
    "mixtral-8x22b": _llama("mixtral-8x22b", 6144, 56, 48, 8, 16384, 32768, n_experts=8, top_k=2,
                            expert_ffn=16384, max_position=65536),
    "qwen3-30b-a3b": _llama("qwen3-30b-a3b", 2048, 48, 32, 4, 6144, 151936, head_dim=128, qk_norm=True,
                            n_experts=128, top_k=8, expert_ffn=768, max_position=40960),
    # DeepSeek-MoE 16B: fine-grained experts (64 routed, top-6) + 2 shared experts, first layer dense,
    # ordinary multi-head attention (V2/V3 use MLA, which this planner does not model).
    "deepseek-moe-16b": _llama("deepseek-moe-16b", 2048, 28, 16, 16, 10944, 102400, n_experts=64, top_k=6,
                               expert_ffn=1408, shared_ffn=2 * 1408, dense_layers=(0,), max_position=4096),
}


def _need(cfg: dict[str, Any], key: str, why: str, source: str) -> int:
    if key not in cfg or cfg[key] is None:
        raise PlanError(f"{source} is missing {key!r} (needed for {why})")
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{source}: {key!r} must be a positive integer, got {value!r}")
    return value


def from_hf_config(cfg: dict[str, Any], name: str = "config.json") -> ModelSpec:
    """Read a Hugging Face config dict (Llama, Mistral, Mixtral, Qwen2/3(-MoE), DeepSeek-MoE shapes)."""
    if not isinstance(cfg, dict):
        raise PlanError(f"{name}: expected a JSON object, got {type(cfg).__name__}")
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal wrappers keep the decoder shape here
    if cfg.get("kv_lora_rank"):
        raise PlanError(f"{name}: multi-head latent attention (kv_lora_rank, DeepSeek-V2/V3) is not modelled; "
                        "the planner covers GQA/MHA decoders")
    h = _need(cfg, "hidden_size", "the hidden size", name)
    L = _need(cfg, "num_hidden_layers", "the layer count", name)
    nh = _need(cfg, "num_attention_heads", "the attention head count", name)
    nkv = cfg.get("num_key_value_heads") or nh  # HF's own default: multi-head attention
    V = _need(cfg, "vocab_size", "the embedding and LM head size", name)
    d = cfg.get("head_dim") or h // nh
    if nh % nkv:
        raise PlanError(f"{name}: num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0
    notes: list[str] = []
    kw: dict[str, Any] = {}
    if n_exp:
        kw["n_experts"] = n_exp
        kw["top_k"] = _need(cfg, "num_experts_per_tok", "MoE routing (experts per token)", name)
        kw["expert_ffn"] = cfg.get("moe_intermediate_size") or _need(
            cfg, "intermediate_size", "the expert width", name)
        shared = (cfg.get("n_shared_experts") or 0) * kw["expert_ffn"]
        kw["shared_ffn"] = shared or cfg.get("shared_expert_intermediate_size") or 0
        dense = set(range(cfg.get("first_k_dense_replace") or 0)) | set(cfg.get("mlp_only_layers") or [])
        step = cfg.get("decoder_sparse_step") or cfg.get("moe_layer_freq") or 1
        dense |= {i for i in range(L) if (i + 1) % step}
        kw["dense_layers"] = tuple(sorted(i for i in dense if i < L))
        ffn = cfg.get("intermediate_size") or kw["expert_ffn"]
    else:
        ffn = _need(cfg, "intermediate_size", "the MLP size", name)
    if "tie_word_embeddings" not in cfg:
        notes.append("tie_word_embeddings not set: assumed untied (the Llama/Qwen default)")
    return ModelSpec(
        name=name, hidden=h, n_layers=L, n_heads=nh, n_kv_heads=nkv, head_dim=d, ffn=ffn, vocab=V,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias") or cfg.get("model_type") == "qwen2"),
        qk_norm=cfg.get("model_type") in ("qwen3", "qwen3_moe"),
        max_position=cfg.get("max_position_embeddings") or 0, notes=tuple(notes), **kw,
    )


def from_engine_config(cfg: Any, name: str = "engine config") -> ModelSpec:
    """Describe a model the engine runs: a shardlm.common.config.ModelConfig or its to_dict().

    q/k/v biases (qkv_bias) are counted; o_proj and MLP biases (o_bias, mlp_bias) are h- and f-sized
    vectors, too small to matter, and are not."""
    from ..common.config import ConfigError, ModelConfig

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
        qk_norm=cfg.qk_norm, max_position=cfg.max_position_embeddings, **moe)


def engine_presets() -> dict[str, Any]:
    """The engine's `random:<name>` presets (shardlm.common.presets.PRESETS: name -> ModelConfig)."""
    from ..common.presets import PRESETS as ENGINE

    return ENGINE


def model_from_dict(cfg: dict[str, Any], name: str = "model config") -> ModelSpec:
    """An engine ModelConfig dict (has the engine's own keys, e.g. qkv_bias) or a Hugging Face config dict."""
    from dataclasses import fields

    from ..common.config import ModelConfig

    engine_keys = {f.name for f in fields(ModelConfig)}
    if isinstance(cfg, dict) and "qkv_bias" in cfg and set(cfg) <= engine_keys:
        return from_engine_config(cfg, name)
    return from_hf_config(cfg, name)


def _known() -> str:
    return (f"planner presets: {', '.join(sorted(PRESETS))}; engine presets (also as random:<name>): "
            f"{', '.join(sorted(engine_presets()))}")


def load_model(spec: str | dict[str, Any]) -> ModelSpec:
    """A planner preset, an engine preset (`random:<name>` or the bare name), a path to config.json (or to
    the folder holding it), or a config dict (Hugging Face or the engine's ModelConfig.to_dict())."""
    if isinstance(spec, dict):
        return model_from_dict(spec)
    if spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        if name in engine_presets():
            return from_engine_config(engine_presets()[name], name)
        if name.lower() in PRESETS:
            return PRESETS[name.lower()]
        raise PlanError(f"unknown preset {spec!r}; {_known()}")
    key = spec.lower()
    if key in PRESETS:
        return PRESETS[key]
    if spec in engine_presets():
        return from_engine_config(engine_presets()[spec], spec)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if path.endswith(".json") or os.path.exists(path):
        return from_hf_config(read_json(path, "config file"), path)
    raise PlanError(f"unknown model {spec!r}: give a config.json path (or its folder) or one of the {_known()}")
