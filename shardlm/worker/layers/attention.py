"""Attention over a paged KV cache.

Tokens of all sequences in a step are flattened ([tokens, ...]); each sequence brings q_len new
tokens (a prompt chunk, or 1 when decoding) on top of `start` tokens already cached. New K/V go
into cache slots; then every sequence's whole context is gathered from its blocks and attended
with one batched scaled_dot_product_attention under a causal-with-offset mask. Prefill, decode,
chunked prefill and cached prefixes are the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...common import envs


@dataclass
class AttentionMetadata:
    """Per-step indexing shared by every layer (built once per step by the model runner)."""

    slot_mapping: torch.Tensor
    """[tokens] cache slot (block * block_size + offset) where each new token's K/V goes"""
    context_slots: torch.Tensor
    """[seqs, max_ctx] cache slot of every context position of each sequence (padding -> 0)"""
    q_index: torch.Tensor
    """[seqs, max_q] flat token index of each sequence's new tokens (padding -> 0)"""
    unpad_index: torch.Tensor
    """[tokens] position of each flat token in the padded [seqs * max_q] layout"""
    mask: torch.Tensor
    """[seqs, 1, max_q, max_ctx] additive: 0 where a query may attend a key, -inf where not (in the
    model's dtype, so attention does not convert a boolean mask in every layer)"""
    decode_only: bool
    """every sequence brings exactly one token: the flat tokens are already [seqs, 1]"""
    folded_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    """mask per GQA group size, repeated over the folded query rows (see PagedAttention); built once per step"""

    def mask_for_group(self, group: int) -> torch.Tensor:
        """The mask for queries laid out [seqs, kv_heads, group * max_q]: row g * max_q + i is query i."""
        if self.decode_only or group == 1:
            return self.mask  # one query row per sequence (or no folding): broadcasts as it is
        if group not in self.folded_masks:
            self.folded_masks[group] = self.mask.repeat(1, 1, group, 1)
        return self.folded_masks[group]




def build_metadata(starts: list[int], q_lens: list[int], block_tables: list[list[int]], block_size: int,
                   device: torch.device, dtype: torch.dtype = torch.float32) -> AttentionMetadata:
    """Index tensors for one step; built on the CPU and moved in one go."""
    n = len(starts)
    ctx_lens = [s + q for s, q in zip(starts, q_lens)]
    max_q = max(q_lens)
    # optional padding of the gathered context to a multiple of SHARDLM_CTX_BUCKET positions (masked out), so
    # attention sees a new shape only every bucket decode steps, for backends that plan per shape (cuDNN's
    # re-planned every decode step: scripts/gpu_overhead.sh, docs/PERFORMANCE.md); off (1) by default
    bucket = envs.ctx_bucket()
    max_ctx = -(-max(ctx_lens) // bucket) * bucket
    width = max(len(b) for b in block_tables)
    tables = torch.zeros(n, width, dtype=torch.long)
    for i, bt in enumerate(block_tables):
        tables[i, : len(bt)] = torch.tensor(bt, dtype=torch.long)
    pos = torch.arange(max_ctx)
    ctx_t, start_t, q_t = torch.tensor(ctx_lens), torch.tensor(starts), torch.tensor(q_lens)
    valid_key = pos.unsqueeze(0) < ctx_t.unsqueeze(1)  # [seqs, max_ctx]
    block_of = (pos // block_size).clamp(max=width - 1).unsqueeze(0).expand(n, -1)
    context_slots = tables.gather(1, block_of) * block_size + (pos % block_size)
    context_slots = context_slots.masked_fill(~valid_key, 0)

    offsets = torch.tensor([0] + q_lens[:-1]).cumsum(0)  # first flat token of each sequence
    qpos = torch.arange(max_q)
    valid_q = qpos.unsqueeze(0) < q_t.unsqueeze(1)  # [seqs, max_q]
    q_index = (offsets.unsqueeze(1) + qpos).masked_fill(~valid_q, 0)
    unpad_index = (torch.arange(n).unsqueeze(1) * max_q + qpos)[valid_q]

    flat_pos = torch.cat([torch.arange(s, s + q) for s, q in zip(starts, q_lens)])
    flat_seq = torch.repeat_interleave(torch.arange(n), q_t)
    slot_mapping = tables[flat_seq, flat_pos // block_size] * block_size + flat_pos % block_size

    # query i of sequence b sits at absolute position start_b + i and sees keys 0..start_b + i
    allowed = (pos.view(1, 1, -1) <= (start_t.view(-1, 1, 1) + qpos.view(1, -1, 1))) & valid_key.unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return AttentionMetadata(
        slot_mapping=slot_mapping.to(device, non_blocking=True),
        context_slots=context_slots.to(device, non_blocking=True),
        q_index=q_index.to(device, non_blocking=True),
        unpad_index=unpad_index.to(device, non_blocking=True),
        mask=mask.unsqueeze(1).to(device, non_blocking=True),
        decode_only=max_q == 1,
    )


class PagedAttention(nn.Module):
    """Local heads of one layer: n_q query heads reading n_kv cached KV heads.

    kv_index[i] is the local KV head of local query head i. It is uniform (each KV head serves
    n_q / n_kv consecutive query heads) except when a TP split cuts through a GQA group.

    Grouped-query attention folds each KV head's group of query heads into the query length
    ([seqs, n_kv, group * max_q, d] against [seqs, n_kv, ctx, d]) instead of asking SDPA for
    enable_gqa: on CUDA that path repeats K/V with repeat_interleave, which waits for the GPU in
    every layer once the batch has more than one sequence (measured: docs/PERFORMANCE.md).
    """

    def __init__(self, n_q: int, n_kv: int, head_dim: int, kv_index: tuple[int, ...], device: torch.device):
        super().__init__()
        self.n_q, self.n_kv, self.head_dim = n_q, n_kv, head_dim
        self.scale = head_dim ** -0.5
        group = n_q // n_kv if n_q % n_kv == 0 else 0
        self.uniform = group > 0 and kv_index == tuple(i // group for i in range(n_q))
        self.register_buffer("kv_index", torch.tensor(kv_index, dtype=torch.long, device=device),
                             persistent=False)
        # [num_blocks * block_size, n_kv, head_dim] each; set by the model runner
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q [tokens, n_q, d]; k, v [tokens, n_kv, d]
        # index_copy_/index_select: the same gathers as advanced indexing, with less work per launch on the CPU
        self.k_cache.index_copy_(0, meta.slot_mapping, k)
        self.v_cache.index_copy_(0, meta.slot_mapping, v)
        n_seqs, max_ctx = meta.context_slots.shape
        flat_slots = meta.context_slots.view(-1)
        keys = self.k_cache.index_select(0, flat_slots).view(n_seqs, max_ctx, self.n_kv, self.head_dim)
        values = self.v_cache.index_select(0, flat_slots).view(n_seqs, max_ctx, self.n_kv, self.head_dim)
        if self.uniform:
            kv_heads, group = self.n_kv, self.n_q // self.n_kv
        else:  # a GQA group split across ranks: give each query head its own copy
            keys = keys.index_select(2, self.kv_index)
            values = values.index_select(2, self.kv_index)
            kv_heads, group = self.n_q, 1
        d = self.head_dim
        if meta.decode_only:
            qp = q.view(n_seqs, 1, self.n_q, d)
        else:
            qp = q.index_select(0, meta.q_index.view(-1)).view(n_seqs, -1, self.n_q, d)
        max_q = qp.shape[1]
        # [seqs, max_q, kv_heads * group, d] -> [seqs, kv_heads, group * max_q, d]
        qp = qp.view(n_seqs, max_q, kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(n_seqs, kv_heads, group * max_q, d)
        out = F.scaled_dot_product_attention(
            qp, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=meta.mask_for_group(group), scale=self.scale,
        )  # [seqs, kv_heads, group * max_q, d]
        out = out.view(n_seqs, kv_heads, group, max_q, d).permute(0, 3, 1, 2, 4).reshape(-1, self.n_q * d)
        return out if meta.decode_only else out.index_select(0, meta.unpad_index)  # [tokens, n_q * d]
