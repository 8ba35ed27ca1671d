"""The elementwise work between a layer's GEMMs, fused: residual add + RMSNorm, and SiLU(gate) x up.

Two paths with one signature each:
- `add_rms_norm_torch(x, residual, weight, eps) -> (normed, new_residual)`: new_residual = x + residual in
  the model dtype (residual None: x itself), normed = weight * rms_norm(new_residual), normalised in
  float32 and scaled in the model dtype as Hugging Face does. Three kernels (add, rms_norm, mul).
- `silu_mul_torch(gate_up) -> silu(gate) * up` over the two halves of the last dimension. Three kernels
  (chunk views are free: silu, mul).
- `add_rms_norm_e4m3_*`, `silu_mul_e4m3_*`: the same, their output handed to an FP8 layer on e4m3 activations
  already quantised per token (layers/fp8.py E4M3Rows, takes_e4m3): the output rounded to the model dtype
  first, then quantised exactly as the layer would (the torch path: the two steps one after the other, on a
  GPU the layer's own quantisation kernel).
- `*_triton`: one kernel each (triton_norm_act.py), the same arithmetic (float32 inside, each result rounded
  once to the model dtype where HF rounds); the e4m3 ones write the e4m3 rows and their scales, not the
  model-dtype output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..layers.fp8 import E4M3Rows, quantize_activations_torch


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x if residual is None else x + residual
    return weight * F.rms_norm(residual, (weight.shape[0],), eps=eps), residual


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _quantised(x: torch.Tensor) -> E4M3Rows:
    """x per token in e4m3 as the FP8 layer would have quantised it itself: on a GPU its Triton kernel (the
    torch path's norm and SiLU on a GPU, SHARDLM_UNFUSED or the torch attention backend, keep the layer's one
    kernel), elsewhere the reference arithmetic"""
    if x.is_cuda:
        from .triton_fp8 import quantize_activations

        return E4M3Rows(*quantize_activations(x), x.dtype)
    return quantize_activations_torch(x)


def add_rms_norm_e4m3_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                            ) -> tuple[E4M3Rows, torch.Tensor]:
    normed, residual = add_rms_norm_torch(x, residual, weight, eps)
    return _quantised(normed), residual


def silu_mul_e4m3_torch(gate_up: torch.Tensor) -> E4M3Rows:
    return _quantised(silu_mul_torch(gate_up))


def add_rms_norm_triton(x, residual, weight, eps):
    from .triton_norm_act import add_rms_norm

    return add_rms_norm(x, residual, weight, eps)


def silu_mul_triton(gate_up):
    from .triton_norm_act import silu_mul

    return silu_mul(gate_up)


def add_rms_norm_e4m3_triton(x, residual, weight, eps):
    from .triton_norm_act import add_rms_norm

    return add_rms_norm(x, residual, weight, eps, e4m3=True)


def silu_mul_e4m3_triton(gate_up):
    from .triton_norm_act import silu_mul_e4m3

    return silu_mul_e4m3(gate_up)


class Paths(NamedTuple):
    add_rms_norm: Callable
    silu_mul: Callable
    add_rms_norm_e4m3: Callable
    silu_mul_e4m3: Callable


PATHS = {"torch": Paths(add_rms_norm_torch, silu_mul_torch, add_rms_norm_e4m3_torch, silu_mul_e4m3_torch),
         "triton": Paths(add_rms_norm_triton, silu_mul_triton, add_rms_norm_e4m3_triton, silu_mul_e4m3_triton)}
