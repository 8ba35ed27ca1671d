"""The elementwise work between a layer's GEMMs, fused: residual add + RMSNorm, and SiLU(gate) x up.

Two paths with one signature each:
- `add_rms_norm_torch(x, residual, weight, eps) -> (normed, new_residual)`: new_residual = x + residual in
  the model dtype (residual None: x itself), normed = weight * rms_norm(new_residual), normalised in
  float32 and scaled in the model dtype as Hugging Face does. Three kernels (add, rms_norm, mul).
- `silu_mul_torch(gate_up) -> silu(gate) * up` over the two halves of the last dimension. Three kernels
  (chunk views are free: silu, mul).
- `*_triton`: one kernel each (triton_norm_act.py), the same arithmetic (float32 inside, each result rounded
  once to the model dtype where HF rounds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x if residual is None else x + residual
    return weight * F.rms_norm(residual, (weight.shape[0],), eps=eps), residual


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_rms_norm_triton(x, residual, weight, eps):
    from .triton_norm_act import add_rms_norm

    return add_rms_norm(x, residual, weight, eps)


def silu_mul_triton(gate_up):
    from .triton_norm_act import silu_mul

    return silu_mul(gate_up)


PATHS = {"torch": (add_rms_norm_torch, silu_mul_torch), "triton": (add_rms_norm_triton, silu_mul_triton)}
