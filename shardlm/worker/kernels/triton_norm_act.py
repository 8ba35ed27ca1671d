"""Triton kernels for norm_act.py (imported only where triton is): residual add + RMSNorm in one pass over a
row, and SiLU(gate) x up. Each rounds to the model dtype exactly where the torch path does (the sum, the
normalised row, the scaled output; silu's output, the product), computing in float32 in between. The e4m3
variants quantise that rounded output per token (layers/fp8.py E4M3Rows) instead of storing it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layers.fp8 import FP8, E4M3Rows
from . import pdl
from .triton_fp8 import e4m3_scale, store_e4m3, store_e4m3_row
from .triton_pdl import pdl_start


@triton.jit
def _add_rms_norm_kernel(X, R, W, OUT, RES_OUT, stride_x, stride_r, stride_o, stride_ro, n, eps, S,
                         HAS_RESIDUAL: tl.constexpr, E4M3: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    """E4M3: OUT gets the normed row quantised per token (e4m3 [rows, n], its scale in S [rows])"""
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
    out = (w.to(tl.float32) * y.to(tl.float32)).to(X.dtype.element_ty)
    if E4M3:
        store_e4m3_row(out.to(tl.float32), row, cols, ok, OUT, S, n)
    else:
        tl.store(OUT + row * stride_o + cols, out, mask=ok)


@triton.jit
def _silu_mul_piece(GU, cols, f):
    """SiLU(gate) x up at columns cols of one row in the model dtype, rounded as the torch path rounds (0 past
    f)"""
    ok = cols < f
    g = tl.load(GU + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + f + cols, mask=ok, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    return (s.to(tl.float32) * u.to(tl.float32)).to(u.dtype)


@triton.jit
def _silu_mul_kernel(GU, OUT, stride_gu, stride_o, f, PDL: tl.constexpr, BLOCK: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y = _silu_mul_piece(GU + row * stride_gu, cols, f)
    tl.store(OUT + row * stride_o + cols, y.to(OUT.dtype.element_ty), mask=cols < f)


@triton.jit
def _silu_mul_e4m3_kernel(GU, Q, S, stride_gu, f, PDL: tl.constexpr, BLOCK: tl.constexpr):
    """a program per row: SiLU(gate) x up over the row in BLOCK-column pieces, for its max and then its e4m3
    values; a row of at most BLOCK columns is read once and kept in registers, a longer one twice (the second
    time from L2)"""
    pdl_start(PDL)
    row = tl.program_id(0)
    gu = GU + row * stride_gu
    if f <= BLOCK:
        cols = tl.arange(0, BLOCK)
        store_e4m3_row(_silu_mul_piece(gu, cols, f).to(tl.float32), row, cols, cols < f, Q, S, f)
    else:
        top = tl.zeros([BLOCK], tl.float32)
        for c in range(0, f, BLOCK):
            top = tl.maximum(top, tl.abs(_silu_mul_piece(gu, c + tl.arange(0, BLOCK), f).to(tl.float32)))
        scale = e4m3_scale(tl.max(top, 0))
        for c in range(0, f, BLOCK):
            cols = c + tl.arange(0, BLOCK)
            store_e4m3(Q + row * f + cols, _silu_mul_piece(gu, cols, f).to(tl.float32), scale, cols < f)
        tl.store(S + row, scale)


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError("the fused norm/activation kernels need the last dimension contiguous")
    return t


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 e4m3: bool = False) -> tuple[torch.Tensor | E4M3Rows, torch.Tensor]:
    """(normed x + residual, x + residual); e4m3: the normed rows as E4M3Rows"""
    x = _rows(x)
    rows, n = x.shape
    out = torch.empty(rows, n, dtype=FP8, device=x.device) if e4m3 else torch.empty_like(x)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device) if e4m3 else weight
    new_residual = x if residual is None else torch.empty_like(x)
    r = x if residual is None else _rows(residual)
    block = triton.next_power_of_2(n)
    use_pdl = pdl(x.device)
    _add_rms_norm_kernel[(rows,)](x, r, weight, out, new_residual, x.stride(0), r.stride(0), out.stride(0),
                                  new_residual.stride(0), n, eps, scale, HAS_RESIDUAL=residual is not None,
                                  E4M3=e4m3, PDL=use_pdl, BLOCK=block, num_warps=min(16, max(1, block // 512)),
                                  launch_pdl=use_pdl)
    return (E4M3Rows(out, scale, x.dtype) if e4m3 else out), new_residual


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


SILU_E4M3_ROW = 16384
"""silu_mul_e4m3 reads a row of up to this many features once (Llama-3-8B's 14,336; 70B's at TP >= 2), held in
the registers of up to 16 warps; a longer row in pieces of it, twice"""


def silu_mul_e4m3(gate_up: torch.Tensor) -> E4M3Rows:
    """silu_mul(gate_up) as E4M3Rows"""
    gate_up = _rows(gate_up)
    rows, f = gate_up.shape[0], gate_up.shape[-1] // 2
    q = torch.empty(rows, f, dtype=FP8, device=gate_up.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=gate_up.device)
    use_pdl = pdl(gate_up.device)
    block = min(SILU_E4M3_ROW, triton.next_power_of_2(f))
    _silu_mul_e4m3_kernel[(rows,)](gate_up, q, scale, gate_up.stride(0), f, PDL=use_pdl, BLOCK=block,
                                   num_warps=max(4, block // 1024), launch_pdl=use_pdl)
    return E4M3Rows(q, scale, gate_up.dtype)
