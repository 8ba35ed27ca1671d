"""The attention layer over the paged KV cache: rotary, the new K/V into the cache, attention.

Each of the three runs through the kernel layer (shardlm.worker.kernels) on the path the model runner
chose for the rank: `torch` (the reference: HF's rotary, index_copy_, gather + SDPA) or `triton` (one
kernel for rotary + cache write, paged attention kernels that read K/V through the block tables).
Tokens of all sequences in a step are flattened ([tokens, ...]); see kernels/paged_attention.py for the
step's metadata.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.paged_attention import (
    AttentionMetadata,
    HeadLayout,
    paged_attention_torch,
    paged_attention_triton,
)
from ..kernels.rope_cache import rope_and_cache_torch, rope_and_cache_triton

PATHS = {"torch": (rope_and_cache_torch, paged_attention_torch),
         "triton": (rope_and_cache_triton, paged_attention_triton)}


class PagedAttention(nn.Module):
    """Local heads of one layer: n_q query heads reading n_kv cached KV heads (kv_index[i]: the local KV
    head of query head i; uneven where a TP split cuts a GQA group)."""

    def __init__(self, n_q: int, n_kv: int, head_dim: int, kv_index: tuple[int, ...], device: torch.device):
        super().__init__()
        self.n_q, self.n_kv, self.head_dim = n_q, n_kv, head_dim
        self.heads = HeadLayout(n_q, n_kv, head_dim, kv_index, device)
        # [num_blocks * block_size, n_kv, head_dim] each; set by the model runner
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.use("torch")

    def use(self, backend: str) -> None:
        """Run on this path from now on ('torch' or 'triton')."""
        self.backend = backend
        self._rope_and_cache, self._attention = PATHS[backend]

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [tokens, n_q, d], k and v [tokens, n_kv, d] (before rotary) -> [tokens, n_q * d]."""
        q, k = self._rope_and_cache(rope, q, k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self._attention(q, self.k_cache, self.v_cache, meta, self.heads)
