"""Process groups built once from a ParallelLayout and handed to layers explicitly."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..common.layout import ParallelLayout
from . import faults
from .kernels.allreduce import (
    NCCL,
    ONE_SHOT,
    PEER_BUFFER_MIN,
    TWO_SHOT,
    AllReduceLimits,
    load_limits,
)

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
    peer: Any = None
    """the TP group's peer-memory buffers (kernels/triton_allreduce.PeerBuffers) when the custom all-reduce
    runs, else None (NCCL or gloo for every message)"""
    limits: AllReduceLimits | None = None
    """which messages take which custom path (with `peer`)"""
    all_reduce_path: str = ""
    """the start-up line: the TP all-reduce's paths, or why it is NCCL's alone"""
    fuse_norm: bool = True
    """sum a layer's partial output in the RMSNorm after it, in one kernel, where the one-shot path takes it
    (SHARDLM_UNFUSED=1: the all-reduce and the add + norm one after the other, for checking)"""

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

    def reduce_path(self, x: torch.Tensor) -> str:
        """Which path summing x takes (the same on every rank of the group for the same shape)."""
        if self.peer is None or not x.is_contiguous():
            return NCCL
        return self.limits.path(x.numel() * x.element_size())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the TP group in place (no-op at tp == 1): over peer memory where the limits say, else
        NCCL (gloo on the CPU)."""
        if self.tp_group is None:
            return x
        path = self.reduce_path(x)
        if path == NCCL:
            dist.all_reduce(x, group=self.tp_group)
        else:
            self.peer.all_reduce(x, two_shot=path == TWO_SHOT)
        return x

    def all_reduce_add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: Any, e4m3: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """norm.add_norm(x summed over the TP group, residual, e4m3): one kernel where the one-shot path takes x
        (it reads the peers' rows, adds the residual, normalises; its output is never e4m3: the FP8 layer after
        it quantises it itself), else the all-reduce and then the norm."""
        if self.norm_in_all_reduce(x):
            return self.peer.all_reduce_add_rms_norm(x, residual, norm.weight, norm.eps)
        return norm.add_norm(self.all_reduce(x), residual, e4m3)

    def norm_in_all_reduce(self, x: torch.Tensor) -> bool:
        """Whether all_reduce_add_norm sums x [rows, hidden] and normalises it in the one-shot kernel."""
        return (self.fuse_norm and x.dim() == 2 and x.shape[1] <= 16384 and self.tp_group is not None
                and self.reduce_path(x) == ONE_SHOT)

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
                     stage_layers: list[tuple[int, int]] | None = None, custom: bool = True) -> ParallelContext:
    """Join the world and create every group (all ranks must create all groups, in the same order); the TP
    group's all-reduce over peer memory unless `custom` is False (setup_all_reduce)."""
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
    ctx = ParallelContext(layout=layout, rank=rank, device=device, tp_group=tp_group, layers=layers)
    setup_all_reduce(ctx, custom)
    return ctx


def peer_problem(custom: bool, gpu: int, peers: list[tuple[str, int]], can_access: Callable[[int, int], bool],
                 triton_ok: bool) -> str | None:
    """Why this rank's TP group cannot sum over peer memory (None: it can). peers: (host, GPU index) of every
    rank of the group, this one included."""
    if not custom:
        return "--disable-custom-all-reduce"
    if len({host for host, _ in peers}) > 1:
        return "the group spans hosts"
    if not triton_ok:
        return "triton is not installed"
    for _, other in peers:
        if other != gpu and not can_access(gpu, other):
            return f"GPU {gpu} cannot access GPU {other}'s memory (no peer-to-peer path)"
    return None


def setup_all_reduce(ctx: ParallelContext, custom: bool) -> None:
    """Give the TP group its peer-memory all-reduce where every pair of its GPUs has peer access (same host,
    NVLink or P2P over PCIe), else say why it stays NCCL's (ctx.all_reduce_path). Collective over the group."""
    from .kernels import triton_available

    if ctx.tp_group is None:
        ctx.all_reduce_path = "none (one GPU per group)"
        return
    if ctx.device.type != "cuda":
        ctx.all_reduce_path = "gloo (CPU)"
        return
    peers: list[Any] = [None] * ctx.tp_size
    dist.all_gather_object(peers, (socket.gethostname(), ctx.device.index), group=ctx.tp_group)
    problem = peer_problem(custom, ctx.device.index, peers, torch.cuda.can_device_access_peer, triton_available())
    verdicts: list[Any] = [None] * ctx.tp_size  # every rank must take the same path
    dist.all_gather_object(verdicts, problem, group=ctx.tp_group)
    problem = next((v for v in verdicts if v), None)
    if problem is not None:
        ctx.all_reduce_path = f"NCCL ({problem})"
        return
    from .kernels.triton_allreduce import PeerBuffers

    limits = load_limits(torch.cuda.get_device_name(ctx.device), ctx.tp_size)
    ctx.peer = PeerBuffers.symmetric(ctx.tp_group, ctx.device, max(limits.max_bytes, PEER_BUFFER_MIN))
    ctx.limits = limits
    kib = lambda b: f"{b >> 10} KiB"  # noqa: E731
    paths = [f"one-shot up to {kib(limits.one_shot_max)}"]
    if limits.two_shot_max > limits.one_shot_max:
        paths.append(f"two-shot up to {kib(limits.two_shot_max)}")
    ctx.all_reduce_path = f"peer memory ({', '.join(paths)}; NCCL above; limits: {limits.source})"
