"""Rotary position embedding of q and k, and the new K/V written into their cache slots: one step of a layer.

Two paths with one signature, `fn(rope, q, k, v, k_cache, v_cache, slot_mapping) -> (q, k)`:
- `rope_and_cache_torch`, the reference: Hugging Face's rotation (x * cos + rotate_half(x) * sin, in the
  model dtype) into new tensors, then index_copy_ of K and V into the cache (an FP8 cache: K and V rounded
  to e4m3 with scale 1, as vLLM's uncalibrated FP8 KV cache does).
- `rope_and_cache_triton`: one kernel rotates q and k in place (float32 inside) and writes K and V to
  their slots; 4 launches per layer become 1.

rope: (cos, signed_sin) [tokens, 1, head_dim] from RotaryEmbedding.lookup (signed_sin = [-sin1, sin2]).
q [tokens, n_q, d], k and v [tokens, n_kv, d] (views of the qkv projection's output are fine: the last
dimension must be contiguous); caches [slots, n_kv, d]; slot_mapping [tokens].
"""

from __future__ import annotations

import torch


def rotate(rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, d] rotated to each token's position. HF rotates x as x * cos + rotate_half(x) * sin,
    rotate_half(x) = [-x2, x1]; the same products, bit for bit, are roll(x) * [-sin1, sin2] (roll(x) =
    [x2, x1]; sin's halves are equal): one roll instead of a negation, two slices and a concatenation."""
    cos, signed_sin = rope
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def rope_and_cache_torch(rope, q, k, v, k_cache, v_cache, slot_mapping):
    q, k = rotate(rope, q), rotate(rope, k)
    if k_cache.dtype == torch.float8_e4m3fn:  # an FP8 cache (scale 1): rounded to e4m3, then copied as bytes
        # (index_copy_ has no FP8 kernel on the CPU)
        k_cache.view(torch.uint8).index_copy_(0, slot_mapping, k.to(k_cache.dtype).view(torch.uint8))
        v_cache.view(torch.uint8).index_copy_(0, slot_mapping, v.to(v_cache.dtype).view(torch.uint8))
    else:
        k_cache.index_copy_(0, slot_mapping, k)
        v_cache.index_copy_(0, slot_mapping, v)
    return q, k


def rope_and_cache_triton(rope, q, k, v, k_cache, v_cache, slot_mapping):
    from .triton_rope import rope_and_cache

    rope_and_cache(rope, q, k, v, k_cache, v_cache, slot_mapping)
    return q, k
