"""Triton kernels of the FP8 linear layers (layers/fp8.py; imported only where triton and CUDA are).

- `fp8_gemm_small_m(x, w, scale, bias)`: y = x (w * scale[:, None])^T for few rows of x (decode): the e4m3
  weights are read once, widened to x's dtype in registers and multiplied on the tensor cores with float32
  accumulation; x stays in bf16/fp16 (weight-only FP8: at batch 1-64 a step reads weights, not activations,
  and no activation rounding is added). A program owns BLOCK_N output features and walks all of K. With
  gemv, 1-4 rows go through `_fp8_gemv_kernel` instead: CUDA-core products, no padding of the rows to the
  tensor cores' 16, 16 features a program.
- `quantize_activations(x)`: x [rows, k] -> (e4m3 rows, float32 scales [rows, 1]) in one kernel, a program
  per row: the per-token activation scales torch._scaled_mm takes for larger batches (the arithmetic of
  layers/fp8.py's quantize_rows: each row's max |x| at 448, scales at least 1e-12).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_gemm_small_m_kernel(X, W, S, B, Y, M, N, K, stride_xm, stride_ym, HAS_BIAS: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(W + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    acc = acc * tl.load(S + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _fp8_gemv_kernel(X, W, S, B, Y, N, K, stride_xm, stride_ym, M: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M (1-4) rows on the CUDA cores: no tensor-core padding to 16 rows, narrow BLOCK_N so that many
    programs stream the weights at once"""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc0 = tl.zeros((BLOCK_N,), tl.float32)
    acc1 = tl.zeros((BLOCK_N,), tl.float32)
    acc2 = tl.zeros((BLOCK_N,), tl.float32)
    acc3 = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(W + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        w = w.to(tl.float32)
        acc0 += tl.sum(w * tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :], axis=1)
        if M > 1:
            acc1 += tl.sum(w * tl.load(X + stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :], axis=1)
        if M > 2:
            acc2 += tl.sum(w * tl.load(X + 2 * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :], axis=1)
        if M > 3:
            acc3 += tl.sum(w * tl.load(X + 3 * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :], axis=1)
    s = tl.load(S + rn, mask=rn < N, other=0.0)
    b = tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros((BLOCK_N,), tl.float32)
    tl.store(Y + rn, (acc0 * s + b).to(Y.dtype.element_ty), mask=rn < N)
    if M > 1:
        tl.store(Y + stride_ym + rn, (acc1 * s + b).to(Y.dtype.element_ty), mask=rn < N)
    if M > 2:
        tl.store(Y + 2 * stride_ym + rn, (acc2 * s + b).to(Y.dtype.element_ty), mask=rn < N)
    if M > 3:
        tl.store(Y + 3 * stride_ym + rn, (acc3 * s + b).to(Y.dtype.element_ty), mask=rn < N)


GEMV_MAX_M = 4
"""up to this many rows the CUDA-core kernel may run (fp8_gemm_small_m's gemv; SHARDLM_FP8_GEMV=1 turns it
on in the engine until scripts/fp8_gemm_bench.py has measured which is faster)"""


def fp8_gemm_small_m(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     gemv: bool = True) -> torch.Tensor:
    """x [m, k] (m <= 64, rows contiguous), w [n, k] e4m3 contiguous, scale [n] float32 -> [m, n] in x's dtype.
    gemv: the CUDA-core kernel for m <= GEMV_MAX_M."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if gemv and m <= GEMV_MAX_M:
        _fp8_gemv_kernel[(triton.cdiv(n, 16),)](
            x, w, scale, bias if bias is not None else scale, y, n, k, x.stride(0), y.stride(0), M=m,
            HAS_BIAS=bias is not None, BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=4)
        return y
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 32 if n <= 8192 else 64  # enough programs to keep every SM reading
    block_k = 256 if block_m == 16 else 128
    _fp8_gemm_small_m_kernel[(triton.cdiv(n, block_n),)](
        x, w, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3)
    return y


@triton.jit
def _quantize_activations_kernel(X, Q, S, K, stride_x, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
    q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    tl.store(Q + row * K + cols, q.to(Q.dtype.element_ty), mask=cols < K)
    tl.store(S + row, scale)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (e4m3 [rows, k], float32 [rows, 1]) with x ~ q * scale, each row's max |x| at 448."""
    rows, k = x.shape
    q = torch.empty(rows, k, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    _quantize_activations_kernel[(rows,)](x, q, s, k, x.stride(0), BLOCK_K=block, num_warps=min(16, max(4, block // 1024)))
    return q, s
