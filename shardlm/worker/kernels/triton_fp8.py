"""Triton kernels of the FP8 linear layers (layers/fp8.py; imported only where triton and CUDA are).

- `fp8_gemm_small_m(x, w, scale, bias)`: y = x (w * scale[:, None])^T for few rows of x (decode batches).
  Weight-only (x in bf16/fp16: the e4m3 weights widened in registers, no activation rounding added) or,
  with `a8`, x already in e4m3 (quantize_activations), multiplied e4m3 by e4m3 on the FP8 tensor cores and
  scaled by both sides' scales at the end. Three kernels share the epilogue: `_fp8_gemv_kernel` (weight-only
  1-4 rows on the CUDA cores, no padding of the rows to the tensor cores' 16: the engine's one-row steps),
  `_fp8_dot_kernel` (tensor cores, float32 accumulation, operands loaded through pointers; `swap` makes the
  weights the MMA's 64-row side and the few rows of x its narrow one) and `_fp8_tma_kernel` (the same on
  e4m3 activations, both operands' tiles fetched by the Tensor Memory Accelerator: Config.tma, what the
  engine runs on e4m3 activations wherever `tma_ok`; 8B's layer at 64 rows 82 us against 88.6, session 18).
  Widening e4m3 weights costs the CUDA cores more than reading them at 2-16 rows (tuned on an H200: 95 us a
  Llama-3-8B layer weight-only at 16 rows, 80 on e4m3 activations, their quantisation included), so the
  engine runs e4m3 activations from two rows up.
- Split-K: a decode GEMM with few output blocks (o_proj, down_proj: 4096 features) would leave most SMs idle
  and the HBM under-read, so its K range is cut in `split_k` pieces run by separate programs. Each stores
  its partial sums in its own slice of a float32 workspace (plain stores: an atomic add of the tensor-core
  accumulator gave wrong sums on an H200); the last program of an output block (a counter per block says
  which) adds the slices in a fixed order from L2, applies scales and bias, writes y and resets the
  counter to zero. One workspace per device serves every layer, in CUDA graphs too (calls on one stream;
  `workspace(device)` allocates it, at a layer's construction).
- PDL (Hopper and later, kernels/__init__.py `pdl`): both GEMM kernels and the quantisation are launched to
  start while the kernel before them runs; nothing reads x, the workspace or the counters before `gdc_wait`.
- `small_m_config(m, n, k)`: the tile sizes, split and kernel each shape runs with (tuned on an H200 by
  scripts/fp8_gemm_bench.py --tune; the measurements are in docs/PERFORMANCE.md).
- `quantize_activations(x)`: x [rows, k] -> (e4m3 rows, float32 scales [rows, 1]) in one kernel, a program
  per row: the per-token activation scales torch._scaled_mm (and a8) take for larger batches (the arithmetic
  of layers/fp8.py's quantize_rows: each row's max |x| at 448, scales at least 1e-12).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..layers.fp8 import SMALL_M, WIDE_N
from . import pdl
from .triton_pdl import pdl_start


@triton.jit
def _write(acc, rm, rn, M, N, Y, stride_ym, S, XS, B, HAS_BIAS: tl.constexpr, HAS_XS: tl.constexpr):
    acc = acc * tl.load(S + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_XS:
        acc = acc * tl.load(XS + rm, mask=rm < M, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _epilogue(acc, rm, rn, M, N, Y, stride_ym, S, XS, B, WS, CNT, SPLIT_K,
              HAS_BIAS: tl.constexpr, HAS_XS: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] float32: whole (SPLIT_K 1) or partial sums of rows rm, features rn -> y"""
    if SPLIT_K > 1:
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offs = rm[:, None] * N + rn[None, :]
        tl.store(WS + tl.program_id(1) * M * N + offs, acc, mask=mask)  # this piece's slice of the workspace
        tl.debug_barrier()  # every thread's partial sums before the counter's release
        done = tl.atomic_add(CNT + tl.program_id(0), 1, sem="acq_rel")
        if done == SPLIT_K - 1:  # the last of this block's programs: every slice is written
            acc = tl.zeros_like(acc)
            for piece in range(0, SPLIT_K):  # (a fixed order: the same sums whichever program came last)
                acc += tl.load(WS + piece * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(CNT + tl.program_id(0), 0)
            _write(acc, rm, rn, M, N, Y, stride_ym, S, XS, B, HAS_BIAS, HAS_XS)
    else:
        _write(acc, rm, rn, M, N, Y, stride_ym, S, XS, B, HAS_BIAS, HAS_XS)


@triton.jit
def _k_range(K, SPLIT_K, BLOCK_K: tl.constexpr):
    """program_id(1)'s piece of K: (its first column, how many BLOCK_K blocks), the pieces as even as they go"""
    blocks = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(blocks, SPLIT_K)
    first = tl.program_id(1) * per
    return first * BLOCK_K, tl.maximum(tl.minimum(per, blocks - first), 0)


@triton.jit
def _fp8_dot_kernel(X, W, S, XS, B, Y, WS, CNT, M, N, K, stride_xm, stride_ym, SPLIT_K,
                    HAS_BIAS: tl.constexpr, A8: tl.constexpr, SWAP: tl.constexpr, PDL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """SWAP: y^T = w x^T, the weights the MMA's first operand (its 64-row side) and the few rows of x its
    narrow one (faster on e4m3 activations at up to 16 rows on an H200; a tie at 17-64)"""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    lo, steps = _k_range(K, SPLIT_K, BLOCK_K)
    kk = lo + tl.arange(0, BLOCK_K)
    xp = X + rm[:, None] * stride_xm + kk[None, :]
    wp = W + rn[:, None] * K + kk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), tl.float32)
    pdl_start(PDL)  # x (and the workspace) only once the kernel before has finished
    for _ in range(0, steps):
        x = tl.load(xp, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(wp, mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        if not A8:
            w = w.to(x.dtype)
        if SWAP:
            acc += tl.dot(w, tl.trans(x))
        else:
            acc += tl.dot(x, tl.trans(w))
        kk += BLOCK_K
        xp += BLOCK_K
        wp += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    _epilogue(acc, rm, rn, M, N, Y, stride_ym, S, XS, B, WS, CNT, SPLIT_K, HAS_BIAS, A8)


@triton.jit
def _fp8_tma_kernel(XD, WD, S, XS, B, Y, WS, CNT, M, N, K, stride_ym, SPLIT_K, HAS_BIAS: tl.constexpr,
                    SWAP: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """_fp8_dot_kernel on e4m3 activations with both operands' tiles fetched by the Tensor Memory Accelerator
    (XD, WD: tensor descriptors of x [M, K] and w [N, K]; rows and columns past their ends read as zeros): the
    copy engine, not the warps' address arithmetic, streams the weights into shared memory"""
    n0 = tl.program_id(0) * BLOCK_N
    lo, steps = _k_range(K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), tl.float32)
    pdl_start(PDL)  # x (and the workspace) only once the kernel before has finished
    for i in range(0, steps):
        x = XD.load([0, lo + i * BLOCK_K])
        w = WD.load([n0, lo + i * BLOCK_K])
        if SWAP:
            acc += tl.dot(w, tl.trans(x))
        else:
            acc += tl.dot(x, tl.trans(w))
    if SWAP:
        acc = tl.trans(acc)
    _epilogue(acc, tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N), M, N, Y, stride_ym, S, XS, B, WS, CNT,
              SPLIT_K, HAS_BIAS, True)


@triton.jit
def _gemv_products(w, X, kk, K, stride_xm, acc0, acc1, acc2, acc3, M: tl.constexpr):
    """one [BLOCK_N, BLOCK_K] e4m3 weight tile times up to 4 rows of x at columns kk, added to acc0..acc3"""
    w = w.to(tl.float32)
    acc0 += w * tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :]
    if M > 1:
        acc1 += w * tl.load(X + stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :]
    if M > 2:
        acc2 += w * tl.load(X + 2 * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :]
    if M > 3:
        acc3 += w * tl.load(X + 3 * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :]
    return acc0, acc1, acc2, acc3


@triton.jit
def _fp8_gemv_kernel(X, W, S, B, Y, WS, CNT, N, K, stride_xm, stride_ym, SPLIT_K, M: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M (1-4) rows on the CUDA cores: products accumulated elementwise over [BLOCK_N, BLOCK_K] tiles, one
    per row, and summed across K once at the end (no cross-thread reduction in the loop). The first weight
    tile is loaded before gdc_wait (PDL: while the kernel before this one still runs), its products taken
    before the loop over the others."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo, steps = _k_range(K, SPLIT_K, BLOCK_K)
    kk = lo + tl.arange(0, BLOCK_K)
    wp = W + rn[:, None] * K + kk[None, :]
    w = tl.load(wp, mask=(rn[:, None] < N) & (kk[None, :] < K) & (steps > 0), other=0.0)
    pdl_start(PDL)  # x (and the workspace) only once the kernel before has finished
    zeros = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc0, acc1, acc2, acc3 = _gemv_products(w, X, kk, K, stride_xm, zeros, zeros, zeros, zeros, M)
    for _ in range(1, steps):
        kk += BLOCK_K
        wp += BLOCK_K
        w = tl.load(wp, mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc0, acc1, acc2, acc3 = _gemv_products(w, X, kk, K, stride_xm, acc0, acc1, acc2, acc3, M)
    rm = tl.arange(0, 4)[:, None]
    acc = tl.where(rm == 0, tl.sum(acc0, axis=1)[None, :], 0.0)
    if M > 1:
        acc += tl.where(rm == 1, tl.sum(acc1, axis=1)[None, :], 0.0)
    if M > 2:
        acc += tl.where(rm == 2, tl.sum(acc2, axis=1)[None, :], 0.0)
    if M > 3:
        acc += tl.where(rm == 3, tl.sum(acc3, axis=1)[None, :], 0.0)
    _epilogue(acc, tl.arange(0, 4), rn, M, N, Y, stride_ym, S, S, B, WS, CNT, SPLIT_K, HAS_BIAS, False)


GEMV_MAX_M = 4
"""up to this many rows the CUDA-core kernel may run"""


class Config(NamedTuple):
    """how fp8_gemm_small_m runs one shape: gemv (CUDA cores, m <= GEMV_MAX_M) or the tensor-core kernel"""
    gemv: bool
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    swap: bool = False  # tensor-core kernel: the weights as the MMA's first operand (y^T = w x^T)
    tma: bool = False  # tensor-core kernel on e4m3 activations: tiles fetched by TMA (_fp8_tma_kernel)


def small_m_config(m: int, n: int, k: int, sms: int = 132, a8: bool = False) -> Config:
    """The configuration a decode GEMM of m rows (<= SMALL_M) of [n, k] e4m3 weights runs with (a8: e4m3
    activations), from scripts/fp8_gemm_bench.py --tune on an H200 (docs/PERFORMANCE.md, sessions 15 and 18):
    weight-only, one row on the CUDA cores and more on the tensor cores; on e4m3 activations the TMA-fed
    kernel, the weights the MMA's 64-row side up to 32 rows and for a wide matrix or a long K (down_proj), the
    rows of x that side for the other matrices at 33-64 rows, on narrow weight tiles. Split-K until the
    output blocks times the pieces keep every SM streaming (`programs` of them), each piece at least 4 K blocks
    long."""
    wide = n >= WIDE_N  # (gate_up: enough output blocks without split, wider tiles read faster)
    long_k = k >= 3 * n  # (down_proj)
    if m == 1 and not a8:  # (a wide or large matrix's one-row step runs on e4m3 activations: layers/fp8.py)
        cfg, programs = Config(True, 32 if wide else 16, 256 if wide else 512, 1, 8, 4), 2 * sms
    elif not a8:
        cfg, programs = Config(False, 32, 128 if m <= 4 else 256, 1, 4, 4), 4 * sms
    elif wide:
        cfg, programs = Config(False, 128, 128, 1, 4, 4, swap=True, tma=True), sms
    elif m <= 16:
        cfg = Config(False, 64, 256 if long_k else 128, 1, 4, 3 if long_k else 4, swap=True, tma=True)
        programs = 3 * sms // 2
    elif m <= 32:
        cfg, programs = Config(False, 64, 256, 1, 8, 3, swap=True, tma=True), sms
    elif long_k:
        cfg, programs = Config(False, 64, 128, 1, 4, 6, swap=True, tma=True), 3 * sms // 2
    else:  # 33-64 rows of qkv, o_proj: narrow weight tiles, many of them, no split
        cfg, programs = Config(False, 16 if n <= k else 32, 256 if n <= k else 128, 1, 4, 5, tma=True), 0
    blocks, split = triton.cdiv(n, cfg.block_n), 1
    while blocks * split < programs and k >= 8 * split * cfg.block_k:
        split *= 2
    return cfg._replace(split_k=split)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """the device's streaming multiprocessors (small_m_config's split targets; the H200's 132 off a GPU)"""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
WORKSPACE_COLS = 1 << 16
"""the split-K workspace holds SMALL_M * WORKSPACE_COLS partial sums (split pieces x rows x features: a
call that would need more runs with fewer pieces)"""


def workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 partial sums [SMALL_M * WORKSPACE_COLS], int32 counters [WORKSPACE_COLS], zeros) on device:
    allocated once (call it before capturing graphs; FP8 layers do at construction); every call leaves the
    counters zero"""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _WORKSPACES:
        _WORKSPACES[device] = (torch.zeros(SMALL_M * WORKSPACE_COLS, device=device, dtype=torch.float32),
                               torch.zeros(WORKSPACE_COLS, device=device, dtype=torch.int32))
    return _WORKSPACES[device]


def tma_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether TMA can fetch e4m3 x [m, k] and w [n, k]: 16-byte aligned bases and rows (k a multiple of 16)"""
    return (x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0 and x.stride(0) % 16 == 0 and w.shape[1] % 16 == 0
            and w.stride(0) == w.shape[1] and x.stride(1) == 1 and w.stride(1) == 1)


def fp8_gemm_small_m(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                     config: Config | None = None) -> torch.Tensor:
    """x [m, k] (m <= SMALL_M, rows contiguous; bf16/fp16, or e4m3 with x_scale [m, 1] float32: the FP8 tensor
    cores), w [n, k] e4m3 contiguous, scale [n] float32 -> [m, n] in out_dtype (x's dtype by default).
    config: small_m_config's by default."""
    m, k = x.shape
    n = w.shape[0]
    assert m <= SMALL_M, m
    a8 = x_scale is not None
    cfg = config or small_m_config(m, n, k, _sm_count(x.device), a8=a8)
    if a8 and cfg.gemv:
        cfg = cfg._replace(gemv=False)
    while cfg.split_k > 1 and (cfg.split_k * m * n > SMALL_M * WORKSPACE_COLS or n > WORKSPACE_COLS):
        cfg = cfg._replace(split_k=cfg.split_k // 2)
    y = torch.empty(m, n, device=x.device, dtype=out_dtype or x.dtype)
    ws, cnt = workspace(x.device)
    b = bias if bias is not None else scale
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64  # (the tensor-core kernels' rows of x: the MMA's 16 or more)
    use_pdl = pdl(x.device)
    if cfg.gemv:
        _fp8_gemv_kernel[grid](x, w, scale, b, y, ws, cnt, n, k, x.stride(0), y.stride(0), cfg.split_k, M=m,
                               HAS_BIAS=bias is not None, PDL=use_pdl, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=use_pdl)
    elif a8 and cfg.tma and max(cfg.block_n, cfg.block_k) <= 256 and tma_ok(x, w):  # (a TMA tile: <= 256 a side)
        xd = TensorDescriptor(x, [m, k], [x.stride(0), 1], [block_m, cfg.block_k])
        wd = TensorDescriptor(w, [n, k], [k, 1], [cfg.block_n, cfg.block_k])
        _fp8_tma_kernel[grid](xd, wd, scale, x_scale, b, y, ws, cnt, m, n, k, y.stride(0), cfg.split_k,
                              HAS_BIAS=bias is not None, SWAP=cfg.swap, PDL=use_pdl, BLOCK_M=block_m,
                              BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages, launch_pdl=use_pdl)
    else:
        _fp8_dot_kernel[grid](x, w, scale, x_scale if a8 else scale, b, y, ws, cnt, m, n, k, x.stride(0),
                              y.stride(0), cfg.split_k, HAS_BIAS=bias is not None, A8=a8, SWAP=cfg.swap, PDL=use_pdl,
                              BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=use_pdl)
    return y


@triton.jit
def e4m3_scale(absmax):
    """a row's scale from its largest |value| (layers/fp8.py quantize_rows' arithmetic: that value maps to 448,
    the largest e4m3; at least 1e-12)"""
    return tl.maximum(absmax / 448.0, 1e-12)


@triton.jit
def store_e4m3(Q, y, scale, mask):
    """float32 values y divided by their row's scale, clamped to e4m3's range, stored in e4m3 at Q"""
    tl.store(Q, tl.minimum(tl.maximum(y / scale, -448.0), 448.0).to(Q.dtype.element_ty), mask=mask)


@triton.jit
def store_e4m3_row(y, row, cols, ok, Q, S, n):
    """one whole row y (float32 at columns cols, 0 where not ok) quantised per token into row `row` of e4m3 Q
    [rows, n], its scale into S[row]: the activation quantisation every e4m3 kernel shares"""
    scale = e4m3_scale(tl.max(tl.abs(y), 0))
    store_e4m3(Q + row * n + cols, y, scale, ok)
    tl.store(S + row, scale)


@triton.jit
def _quantize_activations_kernel(X, Q, S, K, stride_x, PDL: tl.constexpr, BLOCK_K: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    store_e4m3_row(x, row, cols, cols < K, Q, S, K)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (e4m3 [rows, k], float32 [rows, 1]) with x ~ q * scale, each row's max |x| at 448."""
    rows, k = x.shape
    q = torch.empty(rows, k, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    use_pdl = pdl(x.device)
    _quantize_activations_kernel[(rows,)](x, q, s, k, x.stride(0), PDL=use_pdl, BLOCK_K=block,
                                          num_warps=min(16, max(4, block // 1024)), launch_pdl=use_pdl)
    return q, s
