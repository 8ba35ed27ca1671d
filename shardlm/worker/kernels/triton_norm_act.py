"""Triton kernels for norm_act.py (imported only where triton is): residual add + RMSNorm in one pass over a
row, and SiLU(gate) x up. Each rounds to the model dtype exactly where the torch path does (the sum, the
normalised row, the scaled output; silu's output, the product), computing in float32 in between."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .triton_pdl import pdl_start


@triton.jit
def _add_rms_norm_kernel(X, R, W, OUT, RES_OUT, stride_x, stride_r, stride_o, stride_ro, n, eps,
                         HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    y = (xf * inv).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=ok, other=0.0)
    tl.store(OUT + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_kernel(GU, OUT, stride_gu, stride_o, f, PDL: tl.constexpr, BLOCK: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < f
    g = tl.load(GU + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + f + cols, mask=ok, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    tl.store(OUT + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(OUT.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError("the fused norm/activation kernels need the last dimension contiguous")
    return t


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    x = _rows(x)
    n = x.shape[-1]
    out = torch.empty_like(x)
    new_residual = x if residual is None else torch.empty_like(x)
    r = x if residual is None else _rows(residual)
    block = triton.next_power_of_2(n)
    use_pdl = pdl(x.device)
    _add_rms_norm_kernel[(x.shape[0],)](x, r, weight, out, new_residual, x.stride(0), r.stride(0), out.stride(0),
                                        new_residual.stride(0), n, eps, HAS_RESIDUAL=residual is not None,
                                        PDL=use_pdl, BLOCK=block, num_warps=min(16, max(1, block // 512)),
                                        launch_pdl=use_pdl)
    return out, new_residual


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate_up = _rows(gate_up)
    f = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], f, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    use_pdl = pdl(gate_up.device)
    _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(f, block))](gate_up, out, gate_up.stride(0), out.stride(0), f,
                                                                PDL=use_pdl, BLOCK=block, num_warps=4,
                                                                launch_pdl=use_pdl)
    return out
