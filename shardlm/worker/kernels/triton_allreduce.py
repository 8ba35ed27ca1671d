"""Triton all-reduce over peer memory (imported only where triton and CUDA are).

Every rank of a TP group holds one buffer of symmetric memory (torch.distributed._symmetric_memory): the
same size on each GPU, each mapped into every peer's address space, so a kernel on one GPU loads and
stores its peers' buffers directly over NVLink. A buffer starts with the barrier flags and the call counter, then two
halves of data.
No multicast object and no multimem instruction is used: only point-to-point loads, stores and atomics.

One call = one kernel launch with the same grid on every rank; program `pid` of each rank works on the
same part of the message, so a barrier between the programs of one id (not the whole grid) orders what
they share. Every call has a number, its epoch, the same on every rank (each rank counts its calls on
the GPU: the last program of a call to finish stores it), which picks one of two data halves of the
buffer (epoch & 1) and is the value a barrier's flags carry:

    copy-in    each program copies its part of this rank's input into this rank's half
    barrier    (channel 0) every rank's part is in its half
    one-shot   each program sums its part over every rank's half -> the output
    two-shot   the part's owner rank (pid % world) sums it over every half and writes the sum into its
               own half; barrier (channel 1); the other ranks copy the sum from the owner's half

No barrier closes a call: a rank overwrites a half two calls later, and by then every peer has started
the call in between (some program of it passed a barrier with this rank's), so it is done reading.

A barrier: threads 0 .. world-1 of the program each store the epoch into one peer's flag for this
(channel, program, rank) (release, system scope) and wait until this rank's flag from that peer holds
that epoch or a later one (acquire; a peer can be one call ahead), then the program syncs its threads.
Flags are never reset: epochs only grow (compared as a signed difference, so wrapping is harmless).
Peer data is loaded with .cv (not cached: the lines change under us between calls).

`_all_reduce_add_norm_kernel` is the one-shot sum fused with the residual add and RMSNorm of the layer
after (one program per row: it needs the whole row for the norm): the sum is read from the peers, the
residual added, the normed row and the new residual written, as kernels/norm_act.py's add_rms_norm_torch
does after an all-reduce.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHANNELS = 2
"""barrier flags per (program, peer): start, two-shot's middle"""
MAX_PROGRAMS = 256
"""programs per call (the flags are laid out for this many)"""
FLAG_BYTES = 64 << 10
"""the start of each buffer: the flags (CHANNELS x MAX_PROGRAMS x world int32), then at its end the epoch
and the count of programs done with the current call"""
EPOCH_AT = FLAG_BYTES // 4 - 2
"""int32 index of the epoch in a rank's flags (the done count follows it)"""
_EPOCH_AT = tl.constexpr(EPOCH_AT)
_DONE_AT = tl.constexpr(EPOCH_AT + 1)
BLOCK = 2048
"""elements a program moves per iteration"""


@triton.jit
def _tid():
    return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _send_signal(addr, epoch):
    tl.inline_asm_elementwise(
        """
        st.release.sys.global.u32 [$1], $2;
        mov.u32 $0, 0;
        """,
        "=r, l, r", [addr, epoch], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wait_signal(addr, epoch):
    tl.inline_asm_elementwise(
        """
        {
        .reg .u32 %seen;
        .reg .s32 %ahead;
        .reg .pred %p;
        wait_again:
        ld.acquire.sys.global.u32 %seen, [$1];
        sub.s32 %ahead, %seen, $2;
        setp.lt.s32 %p, %ahead, 0;
        @%p bra wait_again;
        mov.u32 $0, 0;
        }
        """,
        "=r, l, r", [addr, epoch], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _barrier(FLAG_PTRS, channel, rank, epoch, WORLD: tl.constexpr, MAX_P: tl.constexpr):
    """Program pid of every rank of the group meets here (see the module's text)."""
    tl.debug_barrier()  # this program's earlier loads and stores come before its signal
    tid = _tid()
    if tid < WORLD:
        slot = (channel * MAX_P + tl.program_id(0)) * WORLD
        peer_flags = tl.load(FLAG_PTRS + tid).to(tl.pointer_type(tl.int32))
        _send_signal(peer_flags + slot + rank, epoch)
        my_flags = tl.load(FLAG_PTRS + rank).to(tl.pointer_type(tl.int32))
        _wait_signal(my_flags + slot + tid, epoch)
    tl.debug_barrier()


@triton.jit
def _epoch(FLAG_PTRS, rank):
    """this call's number (the previous call's + 1)"""
    my_flags = tl.load(FLAG_PTRS + rank).to(tl.pointer_type(tl.int32))
    return tl.load(my_flags + _EPOCH_AT, volatile=True) + 1


@triton.jit
def _half(DATA_PTRS, r, epoch, HALF_BYTES):
    """the address of rank r's data half for this epoch"""
    return tl.load(DATA_PTRS + r) + (epoch & 1).to(tl.int64) * HALF_BYTES


@triton.jit
def _end_call(FLAG_PTRS, rank, epoch):
    """the last program of the call to get here stores the epoch (every program read the old one when it
    started) and zeroes the count for the next call"""
    my_flags = tl.load(FLAG_PTRS + rank).to(tl.pointer_type(tl.int32))
    if tl.atomic_add(my_flags + _DONE_AT, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        tl.store(my_flags + _DONE_AT, 0)
        tl.store(my_flags + _EPOCH_AT, epoch)


@triton.jit
def _all_reduce_kernel(X, OUT, DATA_PTRS, FLAG_PTRS, n, rank, HALF_BYTES, WORLD: tl.constexpr,
                       TWO_SHOT: tl.constexpr, MAX_P: tl.constexpr, BLOCK: tl.constexpr):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    dt = X.dtype.element_ty
    epoch = _epoch(FLAG_PTRS, rank)
    mine = _half(DATA_PTRS, rank, epoch, HALF_BYTES).to(tl.pointer_type(dt))
    cols = tl.arange(0, BLOCK)
    for start in range(pid * BLOCK, n, programs * BLOCK):
        offs = start + cols
        tl.store(mine + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)
    _barrier(FLAG_PTRS, 0, rank, epoch, WORLD, MAX_P)
    if not TWO_SHOT or pid % WORLD == rank:  # one-shot: every program sums; two-shot: the part's owner
        for start in range(pid * BLOCK, n, programs * BLOCK):
            offs = start + cols
            acc = tl.zeros([BLOCK], tl.float32)
            for r in tl.static_range(WORLD):
                peer = _half(DATA_PTRS, r, epoch, HALF_BYTES).to(tl.pointer_type(dt))
                acc += tl.load(peer + offs, mask=offs < n, other=0.0, cache_modifier=".cv").to(tl.float32)
            tl.store(OUT + offs, acc.to(dt), mask=offs < n)
            if TWO_SHOT:
                tl.store(mine + offs, acc.to(dt), mask=offs < n)
    if TWO_SHOT:
        _barrier(FLAG_PTRS, 1, rank, epoch, WORLD, MAX_P)
        if pid % WORLD != rank:
            owner = _half(DATA_PTRS, pid % WORLD, epoch, HALF_BYTES).to(tl.pointer_type(dt))
            for start in range(pid * BLOCK, n, programs * BLOCK):
                offs = start + cols
                tl.store(OUT + offs, tl.load(owner + offs, mask=offs < n, cache_modifier=".cv"), mask=offs < n)
    _end_call(FLAG_PTRS, rank, epoch)


@triton.jit
def _all_reduce_add_norm_kernel(X, R, W, OUT, RES_OUT, DATA_PTRS, FLAG_PTRS, rows, h, eps, rank, HALF_BYTES,
                                stride_x, stride_r, stride_o, stride_ro, WORLD: tl.constexpr,
                                HAS_RESIDUAL: tl.constexpr, MAX_P: tl.constexpr, BLOCK_H: tl.constexpr):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    dt = X.dtype.element_ty
    epoch = _epoch(FLAG_PTRS, rank)
    mine = _half(DATA_PTRS, rank, epoch, HALF_BYTES).to(tl.pointer_type(dt))
    cols = tl.arange(0, BLOCK_H)
    ok = cols < h
    for row in range(pid, rows, programs):
        tl.store(mine + row * h + cols, tl.load(X + row * stride_x + cols, mask=ok), mask=ok)
    _barrier(FLAG_PTRS, 0, rank, epoch, WORLD, MAX_P)
    w = tl.load(W + cols, mask=ok, other=0.0)
    for row in range(pid, rows, programs):
        acc = tl.zeros([BLOCK_H], tl.float32)
        for r in tl.static_range(WORLD):
            peer = _half(DATA_PTRS, r, epoch, HALF_BYTES).to(tl.pointer_type(dt))
            acc += tl.load(peer + row * h + cols, mask=ok, other=0.0, cache_modifier=".cv").to(tl.float32)
        # rounded where an all-reduce and then triton_norm_act's add + RMSNorm round
        x = acc.to(dt)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)).to(dt)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=ok)
        xf = x.to(tl.float32)
        y = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / h + eps)).to(dt)
        tl.store(OUT + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(dt), mask=ok)
    _end_call(FLAG_PTRS, rank, epoch)


def buffer_bytes(max_bytes: int) -> int:
    """the size of each rank's buffer for messages of up to max_bytes"""
    return FLAG_BYTES + 2 * max_bytes


class PeerBuffers:
    """One TP group's buffers as this rank sees them (every rank's address, in rank order; each buffer's
    flags zeroed before any rank of the group calls in) and the kernels over them."""

    def __init__(self, rank: int, ptrs: list[int], max_bytes: int, device: torch.device, keep: object = None):
        self.world, self.rank, self.max_bytes = len(ptrs), rank, max_bytes
        if self.world * CHANNELS * MAX_PROGRAMS > EPOCH_AT:
            raise ValueError(f"the peer all-reduce's flags hold groups of up to "
                             f"{EPOCH_AT // (CHANNELS * MAX_PROGRAMS)} GPUs")
        self.flag_ptrs = torch.tensor(ptrs, dtype=torch.int64, device=device)
        self.data_ptrs = torch.tensor([p + FLAG_BYTES for p in ptrs], dtype=torch.int64, device=device)
        self.keep = keep  # what keeps the buffers mapped

    @classmethod
    def symmetric(cls, group, device: torch.device, max_bytes: int) -> PeerBuffers:
        """Over PyTorch symmetric memory (one GPU per rank; multicast stays off: the workers set
        TORCH_SYMM_MEM_DISABLE_MULTICAST=1). Collective over the group."""
        import torch.distributed as dist
        from torch.distributed import _symmetric_memory as symm

        buffer = symm.empty(buffer_bytes(max_bytes), dtype=torch.uint8, device=device)
        buffer[:FLAG_BYTES].zero_()
        handle = symm.rendezvous(buffer, group)
        torch.cuda.synchronize(device)
        dist.barrier(group)  # every rank's flags are zero before anyone signals
        return cls(dist.get_rank(group), list(handle.buffer_ptrs), max_bytes, device, keep=(buffer, handle))

    def all_reduce(self, x: torch.Tensor, two_shot: bool) -> torch.Tensor:
        """x (contiguous, at most max_bytes) summed over the group, in place."""
        n = x.numel()
        programs = min(MAX_PROGRAMS, triton.cdiv(n, BLOCK))
        if two_shot:  # every rank owns as many parts as the others
            programs = max(self.world, programs - programs % self.world)
        _all_reduce_kernel[(programs,)](x, x, self.data_ptrs, self.flag_ptrs, n, self.rank, self.max_bytes,
                                        WORLD=self.world,
                                        TWO_SHOT=two_shot, MAX_P=MAX_PROGRAMS, BLOCK=BLOCK, num_warps=8)
        return x

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(sum of x over the group + residual) * weight, that sum + residual) for rows [tokens, h]."""
        rows, h = x.shape
        out, new_residual = torch.empty_like(x), torch.empty_like(x)
        r = residual if residual is not None else x
        block_h = triton.next_power_of_2(h)
        _all_reduce_add_norm_kernel[(min(MAX_PROGRAMS, rows),)](
            x, r, weight, out, new_residual, self.data_ptrs, self.flag_ptrs, rows, h, eps, self.rank, self.max_bytes,
            x.stride(0), r.stride(0), out.stride(0), new_residual.stride(0), WORLD=self.world,
            HAS_RESIDUAL=residual is not None, MAX_P=MAX_PROGRAMS, BLOCK_H=block_h,
            num_warps=min(16, max(4, block_h // 512)))
        return out, new_residual
