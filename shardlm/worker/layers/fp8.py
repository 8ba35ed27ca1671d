"""FP8 (e4m3) weights: per-output-channel scales, quantised at load or read from an FP8 checkpoint.

A linear layer in FP8 holds `weight` as float8_e4m3fn [out, in] and `weight_scale` float32 [out]: row o of
the real matrix is weight[o] * weight_scale[o]. On a GPU with FP8 tensor cores (compute capability 8.9+:
Ada, Hopper and later) `fp8_linear` quantises the activations per token (each row's absolute maximum maps
to the e4m3 maximum, 448) and runs torch._scaled_mm with both scales (rowwise scaling), the output in the
activations' dtype. Everywhere else, and as the reference the GPU path is tested against, it multiplies
by the dequantised weights in the activations' dtype (`fp8_linear_torch`: on the CPU, float32, exactly the
model a float32 checkpoint of the dequantised weights gives).

Checkpoints: a tensor `<name>.weight` stored as float8_e4m3fn with `<name>.weight_scale` beside it (per
output channel, [out] or [out, 1], or one per tensor, [] or [1]) is read as it is: the format of
compressed-tensors' float-quantized checkpoints (channel or tensor strategy) and of fbgemm_fp8. Any other
weight is quantised here as it is loaded, so the bf16 copy of a layer never outlives its load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
"""the largest finite e4m3 value"""
MIN_SCALE = 1e-12
"""a row of zeros keeps a positive scale"""


def quantize_rows(w: torch.Tensor, row_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols] -> (e4m3 [rows, cols], float32 scales [rows]) with w ~ q * scale[:, None]. row_max: each
    whole row's largest |value| where w holds only some of its columns (a row-parallel shard), so that every
    TP degree quantises the same model."""
    wf = w.float()
    if row_max is None:
        row_max = wf.abs().amax(dim=1)
    scale = (row_max.float() / FP8_MAX).clamp(min=MIN_SCALE)
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def fp8_linear_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: x times the dequantised weights, in x's dtype."""
    return F.linear(x, dequantize_rows(weight, scale, x.dtype), bias)


def fp8_linear_scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [tokens, in] quantised per token, times the e4m3 weights on the FP8 tensor cores."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
    xq = (x2 / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale[None, :], out_dtype=x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0])


def scaled_mm_ok(device: torch.device) -> bool:
    """Whether torch._scaled_mm's FP8 path runs on this device (a CUDA GPU of compute capability 8.9+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for e4m3 W with per-row scales: the FP8 tensor cores where the device has them
    and the shapes suit them (both dimensions of W multiples of 16), else the reference."""
    if x.is_cuda and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0 and scaled_mm_ok(x.device):
        return fp8_linear_scaled_mm(x, weight, scale, bias)
    return fp8_linear_torch(x, weight, scale, bias)
