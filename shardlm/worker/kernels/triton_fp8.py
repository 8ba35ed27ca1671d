"""Triton kernels of the FP8 linear layers (layers/fp8.py; imported only where triton and CUDA are).

- `fp8_gemm_small_m(x, w, scale, bias)`: y = x (w * scale[:, None])^T for few rows of x (decode): the e4m3
  weights are read once, widened to x's dtype in registers and multiplied on the tensor cores with float32
  accumulation; x stays in bf16/fp16 (weight-only FP8: at batch 1-64 a step reads weights, not activations,
  and no activation rounding is added). A program owns BLOCK_N output features and walks all of K.
- `quantize_rows(x)`: x [rows, k] -> (e4m3 rows, float32 scales [rows, 1]) in one kernel, a program per row:
  the per-token activation scales torch._scaled_mm takes for larger batches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0


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


def fp8_gemm_small_m(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [m, k] (m <= 64, rows contiguous), w [n, k] e4m3 contiguous, scale [n] float32 -> [m, n] in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 32 if n <= 8192 else 64  # enough programs to keep every SM reading
    block_k = 256 if block_m == 16 else 128
    _fp8_gemm_small_m_kernel[(triton.cdiv(n, block_n),)](
        x, w, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3)
    return y


@triton.jit
def _quantize_rows_kernel(X, Q, S, K, stride_x, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
    q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    tl.store(Q + row * K + cols, q.to(Q.dtype.element_ty), mask=cols < K)
    tl.store(S + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (e4m3 [rows, k], float32 [rows, 1]) with x ~ q * scale, each row's max |x| at 448."""
    rows, k = x.shape
    q = torch.empty(rows, k, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(rows,)](x, q, s, k, x.stride(0), BLOCK_K=block, num_warps=min(16, max(4, block // 1024)))
    return q, s
