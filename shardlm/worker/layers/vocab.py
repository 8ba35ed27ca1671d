"""Vocabulary-parallel embedding and LM head: each TP rank holds a contiguous run of vocab rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...common.layout import split_evenly
from ..distributed import ParallelContext
from ..weights import Reader, WeightError
from .fp8 import fp8_path
from .linear import _weight, read_fp8


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding; tokens outside the run contribute zeros to the all-reduce."""

    def __init__(self, name: str, vocab_size: int, hidden: int, ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        self.name, self.ctx, self.vocab_size, self.hidden = name, ctx, vocab_size, hidden
        self.shards = split_evenly(vocab_size, ctx.tp_size)
        self.start, self.end = self.shards[ctx.tp_rank]
        self.weight = nn.Parameter(torch.empty(self.end - self.start, hidden, device=ctx.device, dtype=dtype),
                                   requires_grad=False)

    def load(self, reader: Reader) -> None:
        self.weight.data.copy_(reader.read(f"{self.name}.weight", (self.vocab_size, self.hidden), 0,
                                           self.start, self.end, self.weight.device, self.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.ctx.all_reduce(out)  # [tokens, hidden]


class ParallelLMHead(nn.Module):
    """LM head split by vocab rows like the embedding; logits are gathered only where we sample. fp8: the
    head's rows in e4m3 with a scale each (layers/fp8.py; a tied head quantises its own copy of the
    embedding's rows, `name` then naming the embedding)."""

    def __init__(self, name: str, vocab_size: int, hidden: int, ctx: ParallelContext, dtype: torch.dtype,
                 tied: VocabParallelEmbedding | None = None, fp8: bool = False):
        super().__init__()
        self.name, self.ctx, self.vocab_size, self.hidden, self.dtype = name, ctx, vocab_size, hidden, dtype
        self.shards = split_evenly(vocab_size, ctx.tp_size)
        self.start, self.end = self.shards[ctx.tp_rank]
        self.tied = tied is not None and not fp8
        # a tied head reuses the embedding's shard (same vocab split), so no second copy exists
        self.weight = tied.weight if self.tied else _weight(self.end - self.start, hidden, ctx, dtype, fp8)
        self.weight_scale = (nn.Parameter(torch.empty(self.end - self.start, device=ctx.device), requires_grad=False)
                             if fp8 else None)
        self._fp8_linear = fp8_path(ctx.device) if fp8 else None

    def load(self, reader: Reader) -> None:
        shape = (self.vocab_size, self.hidden)
        if self.weight_scale is not None:
            w, s = read_fp8(reader, self.name, shape, 0, self.start, self.end, self.ctx, self.dtype)
            self.weight.data.copy_(w)
            self.weight_scale.data.copy_(s)
        elif not self.tied:
            if reader.fp8_scale_shape(self.name) is not None:
                raise WeightError(f"{self.name}.weight is stored in FP8 (e4m3): load this checkpoint with "
                                  f"fp8_lm_head=True (--fp8-lm-head) to read the LM head with its scales")
            self.weight.data.copy_(reader.read(f"{self.name}.weight", shape, 0, self.start, self.end,
                                               self.weight.device, self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fp8_linear is not None:
            local = self._fp8_linear(x, self.weight, self.weight_scale)
        else:
            local = F.linear(x, self.weight)  # [n, local vocab]
        sizes = [e - s for s, e in self.shards]
        return self.ctx.all_gather_last_dim(local, sizes).float()  # [n, vocab] on every TP rank
