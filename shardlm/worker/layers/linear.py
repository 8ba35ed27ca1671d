"""Column- and row-parallel linear layers that load their own shard of Hugging Face weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...common.layout import split_evenly
from ..distributed import ParallelContext
from ..kernels.norm_act import PATHS
from ..weights import Reader


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
                 ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        self.prefix, self.parts, self.in_features = prefix, parts, in_features
        rows = sum(p.size for p in parts)
        self.weight = nn.Parameter(torch.empty(rows, in_features, device=ctx.device, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(rows, device=ctx.device, dtype=dtype), requires_grad=False)
                     if bias else None)

    def load(self, reader: Reader) -> None:
        row = 0
        for p in self.parts:
            name = f"{self.prefix}.{p.name}"
            w = reader.read(f"{name}.weight", (p.full_out, self.in_features), 0, p.start, p.end,
                            self.weight.device, self.weight.dtype)
            self.weight.data[row:row + p.size].copy_(w)
            if self.bias is not None:
                b = reader.read(f"{name}.bias", (p.full_out,), 0, p.start, p.end, self.bias.device, self.bias.dtype)
                self.bias.data[row:row + p.size].copy_(b)
            row += p.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split over TP ranks; the partial products are summed with one all-reduce.

    x [tokens, local in] -> [tokens, out], identical on every TP rank after the all-reduce.
    With reduce=False the caller sums the partial products itself (fused with other partial sums).
    """

    def __init__(self, name: str, in_features: int, out_features: int, start: int, end: int,
                 bias: bool, ctx: ParallelContext, dtype: torch.dtype, reduce: bool = True):
        super().__init__()
        if bias and not reduce:
            raise ValueError(f"{name}: a bias must be added after the sum, so it needs reduce=True")
        self.name, self.ctx, self.reduce = name, ctx, reduce
        self.in_features, self.out_features, self.start, self.end = in_features, out_features, start, end
        self.weight = nn.Parameter(torch.empty(out_features, end - start, device=ctx.device, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=ctx.device, dtype=dtype), requires_grad=False)
                     if bias else None)

    def load(self, reader: Reader) -> None:
        w = reader.read(f"{self.name}.weight", (self.out_features, self.in_features), 1, self.start, self.end,
                        self.weight.device, self.weight.dtype)
        self.weight.data.copy_(w)
        if self.bias is not None:
            self.bias.data.copy_(reader.read(f"{self.name}.bias", (self.out_features,), None, 0, 0,
                                             self.bias.device, self.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if not self.reduce:
            return y
        self.ctx.all_reduce(y)  # [tokens, out]: sum of the TP ranks' partial products
        if self.bias is not None:  # added once, after the sum
            y = y + self.bias
        return y


class GatedMLP(nn.Module):
    """SwiGLU MLP (Llama's mlp, Qwen2-MoE's shared expert) with its width f split over TP; reduce=False leaves the partial sum to the caller."""

    def __init__(self, prefix: str, h: int, f: int, bias: bool, ctx: ParallelContext, dtype: torch.dtype,
                 reduce: bool = True):
        super().__init__()
        start, end = split_evenly(f, ctx.tp_size)[ctx.tp_rank]
        self.gate_up_proj = ColumnParallelLinear(prefix, h, [
            RowSlice("gate_proj", f, start, end), RowSlice("up_proj", f, start, end)], bias, ctx, dtype)
        self.down_proj = RowParallelLinear(f"{prefix}.down_proj", f, h, start, end, bias, ctx, dtype, reduce)
        self.use("torch")

    def use(self, backend: str) -> None:
        """SiLU(gate) x up on this path from now on ('torch' or 'triton': one kernel, kernels/norm_act.py)."""
        self._silu_mul = PATHS[backend][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._silu_mul(self.gate_up_proj(x)))  # all-reduce inside down_proj (unless reduce=False)
