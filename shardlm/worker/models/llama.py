"""Llama-family decoder (llama, mistral, qwen2/3, SmolLM; Mixtral and Qwen-MoE experts) with Hugging Face
module names.

Reads like the single-GPU model; the tensor parallelism lives in the layer classes. With TP, o_proj and a
dense MLP's down_proj leave their sums to the RMSNorm after them (`ParallelContext.all_reduce_add_norm`: the
all-reduce, the residual add and the norm in one kernel where the peer-memory path takes the message).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...common.config import ModelConfig
from ...common.layout import shard_heads
from ..distributed import ParallelContext
from ..layers.attention import AttentionMetadata, PagedAttention
from ..layers.fp8 import E4M3Rows
from ..layers.linear import ColumnParallelLinear, GatedMLP, RowParallelLinear, RowSlice
from ..layers.moe import SparseMoE
from ..layers.norm_rope import RMSNorm, RotaryEmbedding
from ..layers.vocab import ParallelLMHead, VocabParallelEmbedding
from ..weights import Reader


def sums_in_norm(ctx: ParallelContext, bias: bool) -> bool:
    """Whether a row-parallel output is summed by the norm after it: with TP, unless a bias must be added
    after the sum."""
    return ctx.tp_group is not None and not bias


class LlamaAttention(nn.Module):
    def __init__(self, prefix: str, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        d, h = cfg.head_dim, cfg.hidden_size
        shard = shard_heads(cfg.num_attention_heads, cfg.num_key_value_heads, ctx.tp_size, ctx.tp_rank)
        self.n_q, self.n_kv, self.head_dim = shard.n_q, shard.n_kv, d
        self.qkv_proj = ColumnParallelLinear(prefix, h, [
            RowSlice("q_proj", cfg.num_attention_heads * d, shard.q_start * d, shard.q_end * d),
            RowSlice("k_proj", cfg.num_key_value_heads * d, shard.kv_start * d, shard.kv_end * d),
            RowSlice("v_proj", cfg.num_key_value_heads * d, shard.kv_start * d, shard.kv_end * d),
        ], cfg.qkv_bias, ctx, dtype, fp8=cfg.quantization == "fp8")
        self.partial = sums_in_norm(ctx, cfg.o_bias)  # the output is this rank's share; the next norm sums it
        self.o_proj = RowParallelLinear(f"{prefix}.o_proj", cfg.num_attention_heads * d, h,
                                        shard.q_start * d, shard.q_end * d, cfg.o_bias, ctx, dtype,
                                        reduce=not self.partial, fp8=cfg.quantization == "fp8")
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's d features, before rotary
            self.q_norm = RMSNorm(f"{prefix}.q_norm", d, cfg.rms_norm_eps, ctx.device, dtype)
            self.k_norm = RMSNorm(f"{prefix}.k_norm", d, cfg.rms_norm_eps, ctx.device, dtype)
        self.attn = PagedAttention(shard.n_q, shard.n_kv, d, shard.kv_index, ctx.device)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        n_q, n_kv, d = self.n_q, self.n_kv, self.head_dim
        q = qkv[:, : n_q * d].view(-1, n_q, d)
        k = qkv[:, n_q * d: (n_q + n_kv) * d].view(-1, n_kv, d)
        v = qkv[:, (n_q + n_kv) * d:].view(-1, n_kv, d)
        if self.q_norm is not None:  # Qwen3 normalises each head of q and k before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn(rope, q, k, v, meta))  # rotary and the cache write inside


class LlamaDecoderLayer(nn.Module):
    def __init__(self, index: int, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype,
                 placement: list[list[int]] | None = None):
        super().__init__()
        p = f"model.layers.{index}"
        self.index, self.ctx = index, ctx
        self.input_layernorm = RMSNorm(f"{p}.input_layernorm", cfg.hidden_size, cfg.rms_norm_eps, ctx.device, dtype)
        self.self_attn = LlamaAttention(f"{p}.self_attn", cfg, ctx, dtype)
        self.post_attention_layernorm = RMSNorm(f"{p}.post_attention_layernorm", cfg.hidden_size,
                                                cfg.rms_norm_eps, ctx.device, dtype)
        self.mlp_partial = False  # a dense MLP's output is this rank's share with TP: the next norm sums it
        if cfg.is_moe_layer(index):
            name = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
            self.mlp = SparseMoE(f"{p}.{name}", cfg, ctx, dtype, placement)
        else:
            self.mlp_partial = sums_in_norm(ctx, cfg.mlp_bias)
            self.mlp = GatedMLP(f"{p}.mlp", cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, ctx, dtype,
                                reduce=not self.mlp_partial, fp8=cfg.quantization == "fp8")

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata, x_partial: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings on the stage's first layer, residual None), this
        rank's share of it if x_partial; residual: the stream's sum before it. Returns this layer's MLP output
        (a share if mlp_partial) and the sum before it: the residual adds are fused into the norms (HF's
        x + attn(norm(x)), then + mlp(norm(..)), same values)."""
        rows = x.shape[0]
        h, residual = add_norm(self.ctx, self.input_layernorm, x, residual, x_partial,
                               self.self_attn.qkv_proj.takes_e4m3(rows))
        h, residual = add_norm(self.ctx, self.post_attention_layernorm, self.self_attn(rope, h, meta), residual,
                               self.self_attn.partial,
                               isinstance(self.mlp, GatedMLP) and self.mlp.gate_up_proj.takes_e4m3(rows))
        return self.mlp(h), residual


def add_norm(ctx: ParallelContext, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None, partial: bool,
             e4m3: bool = False) -> tuple[torch.Tensor | E4M3Rows, torch.Tensor]:
    """norm.add_norm(x, residual, e4m3), x first summed over the TP group when it is this rank's share
    (partial). e4m3: the FP8 layer after the norm takes its input quantised (E4M3Rows), from the norm's kernel
    (where the all-reduce kernel carries the norm, that output comes in the model dtype)."""
    if partial:
        return ctx.all_reduce_add_norm(x, residual, norm, e4m3)
    return norm.add_norm(x, residual, e4m3)


class LlamaModel(nn.Module):
    """One pipeline stage of the decoder: the embedding on the first stage, layers [start, end) with
    their global indices (and HF names), the final norm on the last stage."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, max_positions: int,
                 expert_placement: list | None = None):
        super().__init__()
        self.ctx = ctx
        start, end = ctx.layers
        self.embed_tokens = (VocabParallelEmbedding("model.embed_tokens", cfg.vocab_size, cfg.hidden_size, ctx, dtype)
                             if ctx.is_first_stage else None)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, ctx.device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(i, cfg, ctx, dtype,
                                                      expert_placement[i] if expert_placement else None)
                                    for i in range(start, end))
        self.norm = (RMSNorm("model.norm", cfg.hidden_size, cfg.rms_norm_eps, ctx.device, dtype)
                     if ctx.is_last_stage else None)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x: token ids [tokens] on the first stage, else the previous stage's activations [tokens, hidden]."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)  # [tokens, hidden]
        rope = self.rotary.lookup(positions, x.dtype)
        residual, partial = None, False
        for layer in self.layers:
            x, residual = layer(rope, x, residual, meta, partial)
            partial = layer.mlp_partial
        if self.norm is not None:
            return add_norm(self.ctx, self.norm, x, residual, partial)[0]
        if partial:
            self.ctx.all_reduce(x)
        return x + residual  # the next stage's input


class LlamaForCausalLM(nn.Module):
    """`expert_placement` (MoE with expert parallelism): per decoder layer, None or each EP rank's experts."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, max_positions: int,
                 expert_placement: list | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, ctx, dtype, max_positions, expert_placement)
        self.lm_head = None
        if ctx.is_last_stage:
            # tied: share the embedding's shard on one stage; across stages the head reads its own copy
            # (an FP8 head quantises its own copy of a tied embedding)
            tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
            name = "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"  # (unread by a shared head)
            self.lm_head = ParallelLMHead(name, cfg.vocab_size, cfg.hidden_size, ctx, dtype, tied=tied,
                                          fp8=cfg.fp8_lm_head)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """This stage's output [tokens, hidden]: final hidden states on the last stage (call
        compute_logits on the rows to sample from), activations for the next stage otherwise."""
        return self.model(x, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [n, vocab] float32, gathered over TP

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def moe_layers(self) -> dict[int, SparseMoE]:
        """This stage's MoE blocks by global layer index."""
        return {layer.index: layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)}

    def load_weights(self, reader: Reader, progress: Callable[[int], None] | None = None) -> None:
        """Every layer reads its own shard; `progress(n)` is called as decoder layers finish."""
        if self.model.embed_tokens is not None:
            self.model.embed_tokens.load(reader)
        for layer in self.model.layers:
            for module in layer.modules():
                if module is not layer and hasattr(module, "load"):
                    module.load(reader)
            if progress:
                progress(1)
        if self.lm_head is not None:
            self.model.norm.load(reader)
            self.lm_head.load(reader)
