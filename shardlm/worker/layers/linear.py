"""Column- and row-parallel linear layers that load their own shard of Hugging Face weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...common.layout import split_evenly
from ..distributed import ParallelContext
from ..kernels.norm_act import PATHS
from ..weights import Reader, WeightError
from .fp8 import FP8, E4M3Rows, fp8_path, quantize_rows, takes_e4m3


def _weight(rows: int, cols: int, ctx: ParallelContext, dtype: torch.dtype, fp8: bool) -> nn.Parameter:
    return nn.Parameter(torch.empty(rows, cols, device=ctx.device, dtype=FP8 if fp8 else dtype), requires_grad=False)


def read_fp8(reader: Reader, name: str, shape: tuple[int, int], dim: int, start: int, end: int,
              ctx: ParallelContext, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows/columns [start, end) along dim of `<name>.weight` in FP8 with their per-row scales: as stored in
    an FP8 checkpoint (its scales cut like the rows), else read in `dtype` and quantised here (columns split
    over the TP group: each row's scale from its largest value over the whole group, a MAX all-reduce)."""
    device = ctx.device
    scale_shape = reader.fp8_scale_shape(name)
    if scale_shape is None:
        w = reader.read(f"{name}.weight", shape, dim, start, end, device, dtype)
        row_max = None
        if dim == 1 and end - start < shape[1] and ctx.tp_group is not None:  # (a whole expert: no group)
            row_max = w.float().abs().amax(dim=1)
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=ctx.tp_group)
        return quantize_rows(w, row_max)
    w = reader.read(f"{name}.weight", shape, dim, start, end, device, FP8)
    rows = shape[0]
    if scale_shape in ((), (1,)):  # one scale for the tensor
        s = reader.read(f"{name}.weight_scale", scale_shape, None, 0, 0, device, torch.float32).reshape(1)
        return w, s.expand(w.shape[0])
    if scale_shape not in ((rows,), (rows, 1)):
        raise WeightError(f"{name}.weight_scale has shape {scale_shape}: an FP8 weight of {rows} rows needs one "
                          f"scale per row ({rows},) or ({rows}, 1), or one for the tensor")
    if dim == 0:  # rows split: their scales with them
        s = reader.read(f"{name}.weight_scale", scale_shape, 0, start, end, device, torch.float32)
    else:  # columns split: every row, so every scale
        s = reader.read(f"{name}.weight_scale", scale_shape, None, 0, 0, device, torch.float32)
    return w, s.reshape(-1)


@dataclass(frozen=True)
class RowSlice:
    """One Hugging Face matrix fused into a column-parallel layer: rows [start, end) of `name`."""

    name: str
    """module name under the layer's prefix, e.g. 'q_proj'"""
    full_out: int
    """rows of the whole (unsharded) matrix"""
    start: int
    """first row this rank holds"""
    end: int
    """one past the last row this rank holds"""

    @property
    def size(self) -> int:
        return self.end - self.start


class ColumnParallelLinear(nn.Module):
    """Output features split over TP ranks; several HF matrices may be fused (q/k/v, gate/up).

    x [tokens, in] -> [tokens, sum(local rows)]; no communication: the output stays sharded.
    """

    def __init__(self, prefix: str, in_features: int, parts: list[RowSlice], bias: bool,
                 ctx: ParallelContext, dtype: torch.dtype, fp8: bool = False):
        super().__init__()
        self.prefix, self.parts, self.in_features, self.dtype, self.ctx = prefix, parts, in_features, dtype, ctx
        rows = sum(p.size for p in parts)
        self.weight = _weight(rows, in_features, ctx, dtype, fp8)
        self.weight_scale = (nn.Parameter(torch.empty(rows, device=ctx.device), requires_grad=False)
                             if fp8 else None)
        """fp8: float32 [rows], the real row o is weight[o] * weight_scale[o] (layers/fp8.py)"""
        self._fp8_linear = fp8_path(ctx.device) if fp8 else None
        self.bias = (nn.Parameter(torch.empty(rows, device=ctx.device, dtype=dtype), requires_grad=False)
                     if bias else None)

    def load(self, reader: Reader) -> None:
        row, dev = 0, self.weight.device
        for p in self.parts:
            name = f"{self.prefix}.{p.name}"
            shape = (p.full_out, self.in_features)
            if self.weight_scale is not None:
                w, s = read_fp8(reader, name, shape, 0, p.start, p.end, self.ctx, self.dtype)
                self.weight_scale.data[row:row + p.size].copy_(s)
            else:
                w = reader.read(f"{name}.weight", shape, 0, p.start, p.end, dev, self.dtype)
            self.weight.data[row:row + p.size].copy_(w)
            if self.bias is not None:
                b = reader.read(f"{name}.bias", (p.full_out,), 0, p.start, p.end, dev, self.dtype)
                self.bias.data[row:row + p.size].copy_(b)
            row += p.size

    def takes_e4m3(self, rows: int) -> bool:
        """Whether a step of `rows` rows may come as E4M3Rows (layers/fp8.py takes_e4m3)"""
        return takes_e4m3(self._fp8_linear, rows, *self.weight.shape)

    def forward(self, x: torch.Tensor | E4M3Rows) -> torch.Tensor:
        if self._fp8_linear is not None:
            return self._fp8_linear(x, self.weight, self.weight_scale, self.bias)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split over TP ranks; the partial products are summed with one all-reduce.

    x [tokens, local in] -> [tokens, out], identical on every TP rank after the all-reduce.
    With reduce=False the caller sums the partial products itself (fused with other partial sums).
    """

    def __init__(self, name: str, in_features: int, out_features: int, start: int, end: int,
                 bias: bool, ctx: ParallelContext, dtype: torch.dtype, reduce: bool = True, fp8: bool = False):
        super().__init__()
        if bias and not reduce:
            raise ValueError(f"{name}: a bias must be added after the sum, so it needs reduce=True")
        self.name, self.ctx, self.reduce, self.dtype = name, ctx, reduce, dtype
        self.in_features, self.out_features, self.start, self.end = in_features, out_features, start, end
        self.weight = _weight(out_features, end - start, ctx, dtype, fp8)
        self.weight_scale = (nn.Parameter(torch.empty(out_features, device=ctx.device), requires_grad=False)
                             if fp8 else None)
        """fp8: float32 [out] (every rank holds every row: the input features are what is split)"""
        self._fp8_linear = fp8_path(ctx.device) if fp8 else None
        self.bias = (nn.Parameter(torch.empty(out_features, device=ctx.device, dtype=dtype), requires_grad=False)
                     if bias else None)

    def load(self, reader: Reader) -> None:
        shape, dev = (self.out_features, self.in_features), self.weight.device
        if self.weight_scale is not None:
            w, s = read_fp8(reader, self.name, shape, 1, self.start, self.end, self.ctx, self.dtype)
            self.weight_scale.data.copy_(s)
        else:
            w = reader.read(f"{self.name}.weight", shape, 1, self.start, self.end, dev, self.dtype)
        self.weight.data.copy_(w)
        if self.bias is not None:
            self.bias.data.copy_(reader.read(f"{self.name}.bias", (self.out_features,), None, 0, 0, dev, self.dtype))

    def takes_e4m3(self, rows: int) -> bool:
        """Whether a step of `rows` rows may come as E4M3Rows (layers/fp8.py takes_e4m3)"""
        return takes_e4m3(self._fp8_linear, rows, *self.weight.shape)

    def forward(self, x: torch.Tensor | E4M3Rows) -> torch.Tensor:
        y = self._fp8_linear(x, self.weight, self.weight_scale) if self._fp8_linear is not None else F.linear(x, self.weight)
        if not self.reduce:
            return y
        self.ctx.all_reduce(y)  # [tokens, out]: sum of the TP ranks' partial products
        if self.bias is not None:  # added once, after the sum
            y = y + self.bias
        return y


class GatedMLP(nn.Module):
    """SwiGLU MLP (Llama's mlp, Qwen2-MoE's shared expert) with its width f split over TP; reduce=False leaves the partial sum to the caller."""

    def __init__(self, prefix: str, h: int, f: int, bias: bool, ctx: ParallelContext, dtype: torch.dtype,
                 reduce: bool = True, fp8: bool = False):
        super().__init__()
        start, end = split_evenly(f, ctx.tp_size)[ctx.tp_rank]
        self.gate_up_proj = ColumnParallelLinear(prefix, h, [
            RowSlice("gate_proj", f, start, end), RowSlice("up_proj", f, start, end)], bias, ctx, dtype, fp8)
        self.down_proj = RowParallelLinear(f"{prefix}.down_proj", f, h, start, end, bias, ctx, dtype, reduce, fp8)
        self.use("torch")

    def use(self, backend: str) -> None:
        """SiLU(gate) x up on this path from now on ('torch' or 'triton': one kernel, kernels/norm_act.py)."""
        self._paths = PATHS[backend]

    def forward(self, x: torch.Tensor | E4M3Rows) -> torch.Tensor:
        """x [tokens, h], or E4M3Rows where gate_up_proj.takes_e4m3; SiLU x up hands down_proj its input
        quantised already where it takes e4m3. The all-reduce is inside down_proj (unless reduce=False)."""
        gate_up = self.gate_up_proj(x)
        if self.down_proj.takes_e4m3(gate_up.shape[0]):
            return self.down_proj(self._paths.silu_mul_e4m3(gate_up))
        return self.down_proj(self._paths.silu_mul(gate_up))
