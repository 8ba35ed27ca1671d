"""Model configuration, the one description of a model for the engine and the planner: read from a Hugging
Face config.json dict, a GGUF header or a preset."""

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
"""the model types the engine runs"""
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
ENGINE_ROPE_TYPES = ("default", "linear", "llama3")
"""rotary scalings the engine applies"""


def _arch_problem(model_type: Any) -> str | None:
    if model_type in SUPPORTED_ARCHS:
        return None
    return (f"model_type={model_type!r} is not supported; shardlm runs {', '.join(SUPPORTED_ARCHS)} "
            f"(Llama-family decoders)")


def hf_text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The decoder's part of a Hugging Face config: a multimodal wrapper keeps it under text_config."""
    if "hidden_size" not in hf and isinstance(hf.get("text_config"), dict):
        return hf["text_config"]
    return hf


QUANTIZATIONS = ("fp8",)
"""weight formats the engine runs (ModelConfig.quantization)"""


def checkpoint_quantization(hf: dict[str, Any], source: str, strict: bool = True) -> str | None:
    """The weight format a Hugging Face config's quantization_config declares: 'fp8' for FP8 (e4m3) weights
    with per-channel or per-tensor scales (compressed-tensors float-quantized, fbgemm_fp8), None without one.
    strict: another format is a ConfigError naming it (the planner, not strict, reads the shapes anyway)."""
    q = hf.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = q.get("quant_method")
    if method == "fbgemm_fp8":
        return "fp8"
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values() if isinstance(g, dict)]
        if weights and all(w.get("type") == "float" and w.get("num_bits") == 8
                           and w.get("strategy") in ("channel", "tensor") for w in weights):
            return "fp8"
    if not strict:
        return None
    raise ConfigError(f"{source}: quantization_config (quant_method={method!r}) is not supported: shardlm reads FP8 "
                      f"checkpoints with per-channel or per-tensor scales (compressed-tensors float 8-bit, "
                      f"fbgemm_fp8) and quantises bf16/fp16 checkpoints itself with quantization='fp8'")


@dataclass
class ModelConfig:
    """Shapes and options of a Llama-family decoder, dense or mixture-of-experts (field names follow
    Hugging Face). It also describes decoders the engine does not run (the planner's models, e.g.
    DeepSeek-MoE): check_engine_support says whether the engine runs this one."""

    model_type: str
    """architecture: Hugging Face's model_type; the engine runs SUPPORTED_ARCHS"""
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
    """rotary scaling: None, {"rope_type": "linear", "factor"} or Llama-3's {"rope_type": "llama3", ...}
    (other rope_types describe models the engine does not run)"""
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
    """FFN width of the always-on shared expert (Qwen2-MoE; DeepSeek's n_shared_experts x the expert width;
    0: none)"""
    norm_topk_prob: bool = True
    """renormalise the top-k router probabilities to sum to 1 (Mixtral: always; Qwen-MoE: config)"""
    decoder_sparse_step: int = 1
    """every decoder_sparse_step-th layer is MoE (Qwen-MoE)"""
    mlp_only_layers: list[int] = field(default_factory=list)
    """layers that keep a dense MLP of intermediate_size in an MoE model (Qwen-MoE; DeepSeek's first
    first_k_dense_replace layers and those off its moe_layer_freq)"""
    hidden_act: str = "silu"
    """activation of the gated MLPs"""
    sliding_window: int | None = None
    """attention window in tokens where the config turns one on (Mistral's sliding_window when shorter than
    the context, Qwen's with use_sliding_window); None: every token attends over the full context"""
    quantization: str | None = None
    """the linear layers' weights: None (in the model's dtype) or 'fp8' (e4m3 with per-output-channel scales,
    worker/layers/fp8.py): an FP8 checkpoint's own quantization_config, or quantization='fp8' at load"""
    fp8_lm_head: bool = False
    """with quantization 'fp8': the LM head in FP8 too (EngineArgs.fp8_lm_head)"""

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
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", for_engine: bool = True) -> "ModelConfig":
        """Build from a Hugging Face config.json dict; errors name the missing field and the file.

        for_engine=True (the engine's path) also rejects what the engine does not run (check_engine_support),
        an unsupported model_type before anything else is read. for_engine=False (the planner's path) reads
        the shapes of any decoder with GQA/MHA attention and a gated MLP: other model types (experts counted
        by num_local_experts, num_experts or DeepSeek's n_routed_experts), other rope scalings and sliding
        windows, a multimodal wrapper's text_config. Multi-head latent attention is rejected either way."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object (a Hugging Face config), got {type(hf).__name__}")
        if for_engine and (problem := _arch_problem(hf.get("model_type"))):
            raise ConfigError(f"{source}: {problem}")
        quantization = checkpoint_quantization(hf, source, strict=for_engine)
        hf = hf_text_config(hf)
        if hf.get("kv_lora_rank"):
            raise ConfigError(f"{source}: multi-head latent attention (kv_lora_rank, DeepSeek-V2/V3) is not "
                              f"modelled; shardlm describes decoders with GQA/MHA attention")
        cfg = cls(**_hf_fields(hf, source), quantization=quantization)
        if for_engine:
            cfg.check_engine_support(source)
        return cfg

    def engine_problem(self) -> str | None:
        """Why the engine cannot run this model, with what to change; None when it can."""
        if problem := _arch_problem(self.model_type):
            return problem
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            return f"quantization={self.quantization!r} is not supported; shardlm runs {', '.join(QUANTIZATIONS)}"

        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ENGINE_ROPE_TYPES:
            return f"rope scaling {rope_type!r} is not supported; shardlm supports default, linear and llama3"
        if self.sliding_window is not None and self.model_type in ("mistral", "mixtral"):
            return (f"sliding_window={self.sliding_window} is not supported yet; shardlm attends over the full "
                    f"context (set sliding_window to null)")
        if self.model_type in MOE_ARCHS and self.hidden_act != "silu":
            return f"hidden_act={self.hidden_act!r} is not supported; shardlm's experts use silu"
        if self.sliding_window is not None and self.model_type in ("qwen3", "qwen3_moe", "qwen2_moe"):
            return ("use_sliding_window=true is not supported yet; shardlm attends over the full context "
                    "(set use_sliding_window to false)")
        return None

    def check_engine_support(self, source: str) -> None:
        """Raise ConfigError, prefixed by `source`, if the engine cannot run this model."""
        if problem := self.engine_problem():
            raise ConfigError(f"{source}: {problem}")

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


def _hf_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """ModelConfig's fields from a decoder's Hugging Face config (what the engine runs is not checked here)."""

    def need(key: str) -> int:
        if key not in hf or hf[key] is None:
            raise ConfigError(f"{source}: required field {key!r} is missing")
        try:
            return int(hf[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key!r} must be an integer, got {hf[key]!r}") from None

    model_type = hf.get("model_type") or ""
    n_heads = need("num_attention_heads")
    if n_heads < 1:
        raise ConfigError(f"{source}: num_attention_heads must be positive, got {n_heads}")
    hidden = need("hidden_size")
    # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters
    rope_params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or rope_params or None
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        scaling["rope_type"] = scaling.get("rope_type", scaling.pop("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    window = int(hf.get("sliding_window") or 0)
    if model_type.startswith("qwen"):  # Qwen configs carry a window they use only with use_sliding_window
        window = window if hf.get("use_sliding_window") else 0
    elif window >= int(hf.get("max_position_embeddings", 0) or 0):
        window = 0  # no shorter than the context: attention over the full context
    n_exp = hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts")
    moe: dict[str, Any] = {}
    # the engine's own MoE types always have experts; other types (DeepSeek-MoE, ...) when they count some
    if model_type in MOE_ARCHS or (model_type not in SUPPORTED_ARCHS and n_exp):
        if not n_exp:
            raise ConfigError(f"{source}: required field 'num_local_experts' (or 'num_experts') is missing")
        width = int(hf.get("moe_intermediate_size") or need("intermediate_size"))
        moe = dict(num_experts=int(n_exp), num_experts_per_tok=need("num_experts_per_tok"),
                   moe_intermediate_size=width,
                   shared_expert_intermediate_size=(int(hf.get("n_shared_experts") or 0) * width
                                                    or int(hf.get("shared_expert_intermediate_size") or 0)),
                   norm_topk_prob=model_type == "mixtral" or bool(hf.get("norm_topk_prob", False)),
                   decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
                   mlp_only_layers=[int(i) for i in hf.get("mlp_only_layers") or []])
    eos = hf.get("eos_token_id")
    attention_bias = bool(hf.get("attention_bias", False))
    vocab = need("vocab_size")
    ffn = need("intermediate_size") if not moe or hf.get("intermediate_size") is not None else None
    layers = need("num_hidden_layers")
    if moe:  # DeepSeek: layers before first_k_dense_replace, and those off moe_layer_freq, stay dense
        first_moe, freq = int(hf.get("first_k_dense_replace") or 0), int(hf.get("moe_layer_freq") or 1)
        dense = moe["mlp_only_layers"]
        dense += [i for i in range(layers) if (i < first_moe or i % max(1, freq)) and i not in dense]
        if ffn is None:  # no dense MLP to size when every layer is MoE
            step = moe["decoder_sparse_step"]
            all_moe = all(i not in dense and (i + 1) % max(1, step) == 0 for i in range(layers))
            ffn = moe["moe_intermediate_size"] if all_moe else need("intermediate_size")
    return dict(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or hidden // n_heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias or model_type in ("qwen2", "qwen2_moe"),
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=[] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos]),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        hidden_act=hf.get("hidden_act", "silu"),
        sliding_window=window or None,
        **moe,
    )
