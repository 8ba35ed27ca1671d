"""Process groups built once from a ParallelLayout and handed to layers explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..common.layout import ParallelLayout
from . import faults

# torch 2.13 renamed all_gather_into_tensor (older releases, e.g. on the GPU hosts, lack the new name)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class ParallelContext:
    """What a layer needs to know about parallelism on this rank."""

    layout: ParallelLayout
    """the degrees"""
    rank: int
    """global rank"""
    device: torch.device
    """this rank's device"""
    tp_group: dist.ProcessGroup | None
    """tensor-parallel group of this rank (None when tp == 1)"""
    layers: tuple[int, int] = (0, 0)
    """[start, end) global indices of the decoder layers this rank's pipeline stage owns"""

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def tp_rank(self) -> int:
        return self.layout.coord(self.rank).tp

    @property
    def pp_rank(self) -> int:
        return self.layout.coord(self.rank).pp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def send_next_stage(self, x: torch.Tensor) -> None:
        """Hand activations [tokens, hidden] to the same TP rank of the next pipeline stage."""
        if faults.armed is not None:
            faults.armed.reached("stage_send")
        c = self.layout.coord(self.rank)
        dist.send(x.contiguous(), self.layout.rank(c.dp, c.pp + 1, c.tp))

    def recv_prev_stage(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Activations from the same TP rank of the previous pipeline stage."""
        c = self.layout.coord(self.rank)
        x = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(x, self.layout.rank(c.dp, c.pp - 1, c.tp))
        return x

    @property
    def is_output_rank(self) -> bool:
        """This rank samples and reports tokens to the driver."""
        return self.rank in self.layout.output_ranks()

    def broadcast_from_output_rank(self, x: torch.Tensor) -> None:
        """Copy the output rank's x into x on every rank of this (last-stage) TP group, in place."""
        dist.broadcast(x, self.layout.output_ranks()[self.layout.coord(self.rank).dp], group=self.tp_group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the TP group in place (no-op at tp == 1)."""
        if self.tp_group is not None:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate each TP rank's x along the last dim; rank i contributes sizes[i] columns."""
        if self.tp_group is None:
            return x
        width = max(sizes)
        if x.shape[-1] < width:  # uneven shards: pad to the widest so all_gather sees equal sizes
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        x = x.contiguous()
        out = torch.empty((self.tp_size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=self.tp_group)  # ranks stacked along dim 0
        out = out.view((self.tp_size,) + tuple(x.shape))
        return torch.cat([out[i, ..., :s] for i, s in enumerate(sizes)], dim=-1)


def init_distributed(layout: ParallelLayout, rank: int, backend: str, init_method: str,
                     device: torch.device, timeout_s: float = 600.0,
                     stage_layers: list[tuple[int, int]] | None = None) -> ParallelContext:
    """Join the world and create every group (all ranks must create all groups, in the same order)."""
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank,
                            world_size=layout.world_size, timeout=timedelta(seconds=timeout_s), **kwargs)
    tp_group = None
    for ranks in layout.tp_groups():
        group = dist.new_group(ranks) if layout.tp > 1 else None
        if rank in ranks:
            tp_group = group
    layers = (stage_layers or [(0, 0)])[layout.coord(rank).pp]
    return ParallelContext(layout=layout, rank=rank, device=device, tp_group=tp_group, layers=layers)
