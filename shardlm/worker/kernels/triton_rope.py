"""Triton kernel: rotary of q and k in place, K and V written to their cache slots (imported only where
triton is). One program per (token, block of BLOCK_H heads) over the heads [q heads | k heads]; the
programs over k heads also copy v."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .triton_pdl import pdl_start

BLOCK_H = 4


@triton.jit
def _rope_cache_kernel(Q, K, V, KC, VC, COS, SIN, SLOTS, n_q, n_kv,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_ct, stride_ch, stride_vct, stride_vch, stride_cos, stride_sin,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    tok = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)  # the head dimension padded to a power of two
    d_ok = d < HEAD_DIM
    rolled = (d + HEAD_DIM // 2) % HEAD_DIM
    cos = tl.load(COS + tok * stride_cos + d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(SIN + tok * stride_sin + d, mask=d_ok, other=0.0).to(tl.float32)
    is_q = (h < n_q)[:, None] & d_ok[None, :]
    is_k = ((h >= n_q) & (h < n_q + n_kv))[:, None] & d_ok[None, :]
    kh = h - n_q
    # q heads: rotate in place
    q_ptr = Q + tok * stride_qt + h[:, None] * stride_qh
    x = tl.load(q_ptr + d[None, :], mask=is_q, other=0.0).to(tl.float32)
    xr = tl.load(q_ptr + rolled[None, :], mask=is_q, other=0.0).to(tl.float32)
    tl.store(q_ptr + d[None, :], (x * cos[None, :] + xr * sin[None, :]).to(Q.dtype.element_ty), mask=is_q)
    # k heads: rotate in place and into the cache; v into the cache
    slot = tl.load(SLOTS + tok).to(tl.int64)
    k_ptr = K + tok * stride_kt + kh[:, None] * stride_kh
    x = tl.load(k_ptr + d[None, :], mask=is_k, other=0.0).to(tl.float32)
    xr = tl.load(k_ptr + rolled[None, :], mask=is_k, other=0.0).to(tl.float32)
    k_rot = (x * cos[None, :] + xr * sin[None, :]).to(K.dtype.element_ty)
    tl.store(k_ptr + d[None, :], k_rot, mask=is_k)
    # (an FP8 cache: rounded to e4m3 as stored, scale 1)
    tl.store(KC + slot * stride_ct + kh[:, None] * stride_ch + d[None, :], k_rot.to(KC.dtype.element_ty), mask=is_k)
    v = tl.load(V + tok * stride_vt + kh[:, None] * stride_vh + d[None, :], mask=is_k, other=0.0)
    tl.store(VC + slot * stride_vct + kh[:, None] * stride_vch + d[None, :], v.to(VC.dtype.element_ty), mask=is_k)


def rope_and_cache(rope, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    cos, sin = rope
    tokens, n_q, d = q.shape
    n_kv = k.shape[1]
    if min(t.stride(-1) for t in (q, k, v, k_cache, v_cache, cos, sin)) != 1 or cos.shape[-1] != d:
        raise ValueError("rope_and_cache needs the head dimension contiguous")
    grid = (tokens, triton.cdiv(n_q + n_kv, BLOCK_H))
    use_pdl = pdl(q.device)
    _rope_cache_kernel[grid](q, k, v, k_cache, v_cache, cos, sin, slot_mapping, n_q, n_kv,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                             k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                             cos.stride(0), sin.stride(0), HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_H=BLOCK_H,
                             PDL=use_pdl, num_warps=1, launch_pdl=use_pdl)
