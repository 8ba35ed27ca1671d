"""Triton kernels for paged attention over a flat varlen batch (imported only where triton is).

`_attention_kernel`: one program per (tile, KV head, split). A tile is up to BLOCK_M query rows of one
sequence: BLOCK_M / G_PAD consecutive new tokens x the G_PAD query heads its KV head serves (GQA: each
K/V block is loaded once for the whole group; the head map allows an uneven group from a TP split). The
program walks the keys [0, start + q0 + tokens of the tile) in blocks of BLOCK_N positions (paged_attention's
BLOCK_N for the small tiles, LARGE_BLOCK_N for the large and for float32), each block's slots read through the
sequence's block table: first the keys every row of the tile sees (no mask), then the causal edge. Online
softmax in float32 with exp2; float32 inputs multiply in full precision (no TF32), so the tiny float32
checkpoints match Hugging Face.

Split-KV (flash-decoding): with SPLIT the context is cut into parts of `split_len` positions, one
program each; they write normalised partial outputs and their log-sum-exps, and `_combine_kernel`
merges them. Lengths are runtime arguments (not specialised): only head_dim, block size, tile sizes,
dtype and SPLIT make a new compilation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .paged_attention import BLOCK_N, LARGE_BLOCK_N, SMALL_M
from .triton_pdl import pdl_start


@triton.jit
def _tile_tokens(TILE_Q0, Q_START, tile, seq):
    """(first new token of the tile within its sequence, the sequence's first flat token, its new tokens)."""
    q_begin = tl.load(Q_START + seq)
    return tl.load(TILE_Q0 + tile), q_begin, tl.load(Q_START + seq + 1) - q_begin


@triton.jit(do_not_specialize=["split_len", "stride_bt"])
def _attention_kernel(Q, K, V, O, PART_O, PART_LSE, BT, SEQ_START, Q_START, TILE_SEQ, TILE_Q0, HEAD_MAP,
                      qk_scale, split_len,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                      stride_bt, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
                      G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                      PDL: tl.constexpr):
    pdl_start(PDL)
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(TILE_SEQ + tile)
    if seq < 0:
        return
    q0, q_begin, q_len = _tile_tokens(TILE_Q0, Q_START, tile, seq)
    start = tl.load(SEQ_START + seq)
    BLOCK_Q: tl.constexpr = BLOCK_M // G_PAD

    rows = tl.arange(0, BLOCK_M)
    t = q0 + rows // G_PAD  # the row's new token, within its sequence
    head = tl.load(HEAD_MAP + kvh * G_PAD + rows % G_PAD)
    row_ok = (t < q_len) & (head >= 0)
    d = tl.arange(0, BLOCK_D)  # the head dimension, padded to a power of two >= 16 (tl.dot's minimum)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + (q_begin + t)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = start + t

    kv_end = tl.minimum(start + q_len, start + q0 + BLOCK_Q)  # the last row's context
    lo = 0
    hi = kv_end
    if SPLIT:
        lo = tl.program_id(2) * split_len
        hi = tl.minimum(lo + split_len, kv_end)
    # every row of the tile sees the keys before its first token; the blocks past that need the causal mask
    full_hi = tl.maximum(tl.minimum(hi, ((start + q0) // BLOCK_N) * BLOCK_N), lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    bt_row = BT + seq * stride_bt
    for n in range(lo, full_hi, BLOCK_N):
        pos = n + cols
        slot = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        if BLOCK_D == HEAD_DIM:
            k = tl.load(K + slot[None, :] * stride_kt + kvh * stride_kh + d[:, None]).to(q.dtype)  # [BLOCK_D, BLOCK_N]
        else:
            k = tl.load(K + slot[None, :] * stride_kt + kvh * stride_kh + d[:, None], mask=d_ok[:, None],
                        other=0.0).to(q.dtype)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if BLOCK_D == HEAD_DIM:
            v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :]).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        else:
            v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=d_ok[None, :],
                        other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    for n in range(full_hi, hi, BLOCK_N):
        pos = n + cols
        key_ok = pos < hi
        slot = tl.load(bt_row + pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k = tl.load(K + slot[None, :] * stride_kt + kvh * stride_kh + d[:, None], mask=key_ok[None, :] & d_ok[:, None],
                    other=0.0).to(q.dtype)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = tl.where(key_ok[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=key_ok[:, None] & d_ok[None, :],
                    other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tok = q_begin + t
    if SPLIT:
        part = tl.program_id(2)
        tl.store(PART_O + part * stride_ps + tok[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(PART_LSE + part * stride_ls + tok * stride_lt + head, lse, mask=row_ok)
    else:
        tl.store(O + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["splits"])
def _combine_kernel(O, PART_O, PART_LSE, Q_START, TILE_SEQ, TILE_Q0, splits,
                    stride_ot, stride_oh, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
                    BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """One program per (tile, query head): merge the parts of each of the tile's tokens, weighting each
    part's output by exp2(its log-sum-exp - the largest). Part 0 always holds keys (position 0)."""
    pdl_start(PDL)
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(TILE_SEQ + tile)
    if seq < 0:
        return
    q0, q_begin, q_len = _tile_tokens(TILE_Q0, Q_START, tile, seq)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    for i in range(BLOCK_Q):
        t = q0 + i
        if t < q_len:
            tok = q_begin + t
            lse_ptr = PART_LSE + tok * stride_lt + head
            o_ptr = PART_O + tok * stride_pt + head * stride_ph + d
            m = tl.load(lse_ptr)
            for p in range(1, splits):
                m = tl.maximum(m, tl.load(lse_ptr + p * stride_ls))
            w = tl.exp2(tl.load(lse_ptr) - m)
            total = w
            acc = w * tl.load(o_ptr, mask=d_ok, other=0.0)
            for p in range(1, splits):
                w = tl.exp2(tl.load(lse_ptr + p * stride_ls) - m)  # an empty part: lse -inf, weight 0
                total += w
                acc += w * tl.load(o_ptr + p * stride_ps, mask=d_ok, other=0.0)
            tl.store(O + tok * stride_ot + head * stride_oh + d, (acc / total).to(O.dtype.element_ty), mask=d_ok)


LOG2E = 1.4426950408889634
SMALL_TILE_LAUNCH = {"num_warps": 4, "num_stages": 2}
"""how the small tiles' launch (decodes, short chunks) runs, BLOCK_N keys a step (scripts/attention_bench.py
--sweep tries others)"""
FLOAT32_SMALL_TILE_LAUNCH = {"num_warps": 4, "num_stages": 3}
"""the small tiles' launch on float32 inputs, LARGE_BLOCK_N keys a step: 128 float32 keys in two stages need
147 KB of shared memory at head_dim 128, past the ~99 KB of Ada and consumer cards (a split part, a whole
number of BLOCK_N keys, is one of LARGE_BLOCK_N keys too)"""
LARGE_TILE_LAUNCH = {"num_warps": 8, "num_stages": 2}
"""how the large tiles' launch (prompt chunks) runs, LARGE_BLOCK_N keys a step"""


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, meta, launch, heads) -> None:
    """One launch (paged_attention.Launch) of the step into out [tokens, n_q, head_dim]."""
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged attention needs the head dimension contiguous")
    tiles = launch.tile_seq.shape[0]
    split = launch.splits > 1
    ws = meta.workspace
    if split and ws is None:
        raise ValueError("split-KV needs the attention workspace (AttentionMetadata.workspace)")
    part_o, part_lse = ws.parts(launch.splits) if split else (out, out)  # (not read without SPLIT)
    block_m = launch.block_m
    large = block_m > SMALL_M
    if large:
        block_n, options = LARGE_BLOCK_N, LARGE_TILE_LAUNCH
    elif q.dtype == torch.float32:
        block_n, options = LARGE_BLOCK_N, FLOAT32_SMALL_TILE_LAUNCH
    else:
        block_n, options = BLOCK_N, SMALL_TILE_LAUNCH
    block_d = max(16, triton.next_power_of_2(heads.head_dim))
    use_pdl = pdl(q.device)
    _attention_kernel[(tiles, heads.n_kv, launch.splits)](
        q, k_cache, v_cache, out, part_o, part_lse, meta.block_tables, meta.seq_starts, meta.query_start,
        launch.tile_seq, launch.tile_q0, heads.head_map, heads.scale * LOG2E, launch.split_len,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), meta.block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        G_PAD=heads.g_pad, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=heads.head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=meta.block_size,
        SPLIT=split, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PDL=use_pdl,
        **options, launch_pdl=use_pdl)
    if split:
        _combine_kernel[(tiles, heads.n_q)](
            out, part_o, part_lse, meta.query_start, launch.tile_seq, launch.tile_q0, launch.splits,
            out.stride(0), out.stride(1), part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            BLOCK_Q=max(1, block_m // heads.g_pad), HEAD_DIM=heads.head_dim, BLOCK_D=block_d, PDL=use_pdl,
            num_warps=1, launch_pdl=use_pdl)
