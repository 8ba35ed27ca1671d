"""FP8 (e4m3) weights: per-output-channel scales, quantised at load or read from an FP8 checkpoint.

A linear layer in FP8 holds `weight` as float8_e4m3fn [out, in] and `weight_scale` float32 [out]: row o of
the real matrix is weight[o] * weight_scale[o]. On a GPU with FP8 tensor cores (compute capability 8.9+:
Ada, Hopper and later) `fp8_linear_kernels` runs one-row steps through a weight-only Triton kernel (the
e4m3 weights widened in registers, the activations left in bf16; a wide or large matrix excepted, WIDE_N and
LARGE_BYTES) and larger ones with the activations quantised per token too (each row's absolute maximum maps to
the e4m3 maximum, 448): up to SMALL_M rows through a Triton kernel on the FP8 tensor cores, above through
torch._scaled_mm (rowwise scaling).
Everywhere else, and as the reference the GPU path is tested against, `fp8_linear_torch` multiplies by the
dequantised weights in the activations' dtype (on the CPU, float32: exactly the model a float32 checkpoint
of the dequantised weights gives). `fp8_path(device)` picks one.

Checkpoints: a tensor `<name>.weight` stored as float8_e4m3fn with `<name>.weight_scale` beside it (per
output channel, [out] or [out, 1], or one per tensor, [] or [1]) is read as it is: the format of
compressed-tensors' float-quantized checkpoints (channel or tensor strategy) and of fbgemm_fp8. Any other
weight is quantised here as it is loaded, so the bf16 copy of a layer never outlives its load.
"""

from __future__ import annotations

from typing import NamedTuple

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


class E4M3Rows(NamedTuple):
    """Activations already quantised per token by the kernel that made them (the fused RMSNorm or SiLU x up,
    kernels/norm_act.py), for an FP8 layer on e4m3 activations (`takes_e4m3`): x ~ q * scale, each row's max
    |x| at 448, exactly as the layer would have quantised x itself."""

    q: torch.Tensor
    """float8_e4m3fn [rows, k]"""
    scale: torch.Tensor
    """float32 [rows, 1]"""
    dtype: torch.dtype
    """the dtype x had, and the layer's output has"""


def quantize_activations_torch(x: torch.Tensor) -> E4M3Rows:
    """x [rows, k] -> its E4M3Rows (quantize_rows' arithmetic; the reference of the fused kernels)"""
    q, scale = quantize_rows(x)
    return E4M3Rows(q, scale[:, None], x.dtype)


def fp8_linear_torch(x: torch.Tensor | E4M3Rows, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: x times the dequantised weights, in x's dtype (E4M3Rows: dequantised first)."""
    if isinstance(x, E4M3Rows):
        x = (x.q.float() * x.scale).to(x.dtype)
    return F.linear(x, dequantize_rows(weight, scale, x.dtype), bias)


SMALL_M = 64
"""up to this many rows (decode batches) the Triton kernels run; above, torch._scaled_mm"""
A8_ABOVE = 1
"""above this many rows the activations are quantised per token too (e4m3 x e4m3 on the tensor cores: from
two rows up widening the weights costs more than reading them); up to it the kernel is weight-only"""
WIDE_N = 16384
"""a matrix of at least this many output rows (Llama-3-8B's gate_up, an LM head) is wide: enough output
blocks without split-K, so its one-row step also runs on e4m3 activations, where the tensor-core kernel (the
weights as the MMA's 64-row side, fed by cp.async) reads it faster than the weight-only GEMV, the
activations' quantisation included (8B gate_up at one row on an H200: 31.9 us against 33-35, session 16)"""
LARGE_BYTES = 64 << 20
"""a matrix of at least this many e4m3 weights runs its one-row step on e4m3 activations too: the swapped TMA
kernel read Llama-3-70B's qkv, o and down at 2 rows in 25.6 / 22.2 / 60.2 us where the weight-only GEMV took
28.2 / 26.6 / 83.6 at one (H200, session 19); below it (8B's qkv, o, down: 25-59 MB) the GEMV is faster"""


def e4m3_activations(rows: int, n: int, k: int) -> bool:
    """Whether a step of `rows` rows through an FP8 matrix [n, k] quantises its activations."""
    return rows > A8_ABOVE or n >= WIDE_N or n * k >= LARGE_BYTES


def takes_e4m3(fp8_linear, rows: int, n: int, k: int) -> bool:
    """Whether a layer running `fp8_linear` (fp8_path's choice; None: not FP8) multiplies a step of `rows` rows
    through its [n, k] weights on e4m3 activations, so that the kernel before it may hand it E4M3Rows: the
    GPU path, where e4m3_activations says so (the reference multiplies the activations as they are), unless
    SHARDLM_NO_FP8_FUSION=1."""
    from ...common import envs

    return fp8_linear is fp8_linear_kernels and e4m3_activations(rows, n, k) and not envs.no_fp8_fusion()


def fp8_linear_kernels(x: torch.Tensor | E4M3Rows, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The GPU path (FP8 tensor cores, kernels/triton_fp8.py): up to A8_ABOVE rows of a matrix narrower than
    WIDE_N and smaller than LARGE_BYTES through the weight-only Triton kernel, other steps of up to SMALL_M rows
    through the Triton kernel on e4m3 activations (per-token scales), more through torch._scaled_mm with the
    same activation scales (both dimensions of W multiples of 16; else the Triton kernel, SMALL_M rows at a
    time: e.g. an LM head shard of a vocabulary the TP degree cuts into rows no multiple of 16). x may come
    quantised already (E4M3Rows: where takes_e4m3 says this path quantises it)."""
    from ..kernels.triton_fp8 import fp8_gemm_small_m, quantize_activations

    if isinstance(x, E4M3Rows):  # quantised by the kernel before (rows [rows, k])
        (xq, x_scale, dtype), shape = x, x.q.shape
    else:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if not e4m3_activations(x2.shape[0], *weight.shape):
            return fp8_gemm_small_m(x2, weight, scale, bias).reshape(*shape[:-1], weight.shape[0])
        xq, x_scale = quantize_activations(x2)
    rows = xq.shape[0]
    if rows > SMALL_M and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0:
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale[None, :], out_dtype=dtype)
        if bias is not None:
            y = y + bias
    else:
        parts = [fp8_gemm_small_m(xq[i:i + SMALL_M], weight, scale, bias, x_scale=x_scale[i:i + SMALL_M],
                                  out_dtype=dtype) for i in range(0, rows, SMALL_M)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
    return y.reshape(*shape[:-1], weight.shape[0])


def fp8_grouped_mm(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Rows of e4m3 xq [rows, k] (float32 x_scale [rows]) grouped by expert (offs: int32 cumulative row
    counts, a group per expert) times each expert's e4m3 w [experts, n, k] (float32 w_scale [experts, n]):
    [rows, n] in out_dtype (torch._scaled_grouped_mm, Hopper: rows past the last offset come back undefined)."""
    return torch._scaled_grouped_mm(xq, w.transpose(1, 2), x_scale, w_scale, offs=offs, out_dtype=out_dtype)


def fp8_grouped_ok(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether fp8_grouped_mm runs here: torch's grouped FP8 GEMM (CUDA, compute capability 9.0 or 10.0),
    bfloat16 results, every dimension a multiple of 16, the FP8 kernels not turned off
    (SHARDLM_FP8_REFERENCE)."""
    from ...common import envs

    return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability(device) in ((9, 0), (10, 0)) and all(d % 16 == 0 for d in dims)
            and not envs.fp8_reference())


def scaled_mm_ok(device: torch.device) -> bool:
    """Whether the device has FP8 tensor cores (a CUDA GPU of compute capability 8.9+: Ada, Hopper, later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_path(device: torch.device):
    """The FP8 linear function a layer on `device` uses: the kernels on a GPU with FP8 tensor cores (unless
    SHARDLM_FP8_REFERENCE=1), else the reference. Same signature: (x, weight, scale, bias=None)."""
    from ...common import envs

    if scaled_mm_ok(device) and not envs.fp8_reference():
        from ..kernels.triton_fp8 import workspace

        workspace(device)  # the split-K sums' zeros, allocated before any graph is captured
        return fp8_linear_kernels
    return fp8_linear_torch
