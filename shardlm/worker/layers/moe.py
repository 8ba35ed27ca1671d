"""Sparse mixture-of-experts block (Mixtral, Qwen2-MoE, Qwen3-MoE) in two parallel forms.

Tensor-parallel experts (expert parallelism off): every rank holds a 1/tp slice of every expert's
FFN, routes all tokens, runs the experts the tokens picked on its slice, and one all-reduce sums
the slices (the same communication as a dense MLP).

Expert parallel (EP, over the TP ranks of the stage): every rank holds whole experts (the
placement says which; hot experts may have copies on several ranks). Each rank takes a contiguous
share of the step's tokens, routes them, and sends each (token, expert) row to a rank that holds
the expert with an all-to-all; that rank runs its experts on what it received and sends the
outputs back with the reverse all-to-all; the sender weights them by the router probabilities.
One all-reduce over the stage then gives every rank all tokens' outputs (each rank contributes its
own token rows, plus its slice of the shared expert where the model has one).

Small steps (decode) use fixed-capacity all-to-alls: every rank sends every peer a block big
enough for all its rows (padding marked by an out-of-range slot), so no row count has to reach the
host and the GPU is never waited for. Large steps (prefill) exchange the counts first and send
exactly the rows (a variable all-to-all), which needs the counts on the host.

Either way the local experts run as one grouped computation: a grouped GEMM on Hopper GPUs in
bf16 (torch._grouped_mm), otherwise a loop over the experts that received tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...common import envs
from ...common.config import ModelConfig
from ...common.layout import split_evenly
from .. import faults
from ..distributed import ParallelContext
from ..weights import Reader
from .fp8 import FP8, fp8_grouped_mm, fp8_grouped_ok, fp8_path
from .linear import GatedMLP, read_fp8


def _grouped_mm_usable(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(device) >= (9, 0) and all(d % 16 == 0 for d in dims))


def count(values: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0 .. n-1 occurs in `values` (int64, all < n), without waiting for the GPU: CUDA's
    torch.bincount reads the largest value on the host to size its output."""
    return torch.zeros(n, dtype=torch.long, device=values.device).scatter_add_(0, values, torch.ones_like(values))


def choose_copies(experts: torch.Tensor, copy_count: torch.Tensor, rank: int) -> torch.Tensor:
    """Which copy of its expert each routed row goes to: the rows of one expert take its copies in
    turn, starting at a different copy on each sending rank, so a hot expert's load is split evenly."""
    n = experts.numel()
    by_expert = torch.argsort(experts, stable=True)
    per_expert = count(experts, copy_count.numel())
    first = torch.cumsum(per_expert, 0) - per_expert
    position = torch.empty_like(experts)
    position[by_expert] = torch.arange(n, device=experts.device) - first[experts[by_expert]]
    return (position + rank) % copy_count[experts]


class SparseMoE(nn.Module):
    """x [tokens, hidden] (identical on every TP rank) -> [tokens, hidden], summed over the TP group."""

    def __init__(self, prefix: str, cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype,
                 placement: list[list[int]] | None):
        super().__init__()
        self.prefix, self.ctx, self.cfg = prefix, ctx, cfg
        self.mixtral = cfg.model_type == "mixtral"
        h, E, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.hidden, self.num_experts, self.top_k = h, E, cfg.num_experts_per_tok
        # EP steps whose fixed-capacity buffers (ep x capacity rows) stay within this many rows take the
        # padded, sync-free dispatch (decode); bigger ones (prefill) the exact-size one
        self.padded_max_rows = envs.ep_padded_max_rows()
        self.ep = ctx.layout.ep
        self.rank = ctx.tp_rank
        if self.ep > 1:
            if placement is None or len(placement) != self.ep:
                raise ValueError(f"{prefix}: expert parallelism needs a placement with one expert list per rank")
            self.local = list(placement[self.rank])
            self.f_start, self.f_end = 0, f
            # copies[e] = [(rank, slot), ...] for every copy of expert e
            copies: list[list[tuple[int, int]]] = [[] for _ in range(E)]
            for r, experts in enumerate(placement):
                for slot, e in enumerate(experts):
                    copies[e].append((r, slot))
            if any(not c for c in copies):
                raise ValueError(f"{prefix}: placement leaves expert(s) {[e for e in range(E) if not copies[e]]} unplaced")
            width = max(len(c) for c in copies)
            self.slots = max(len(p) for p in placement)
            pad = lambda c, i: [c[j % len(c)][i] for j in range(width)]  # noqa: E731
            self.register_buffer("copy_count", torch.tensor([len(c) for c in copies], device=ctx.device), persistent=False)
            self.register_buffer("copy_rank", torch.tensor([pad(c, 0) for c in copies], device=ctx.device), persistent=False)
            self.register_buffer("copy_slot", torch.tensor([pad(c, 1) for c in copies], device=ctx.device), persistent=False)
        else:
            self.local = list(range(E))
            self.f_start, self.f_end = split_evenly(f, ctx.tp_size)[ctx.tp_rank]
        n, fl = len(self.local), self.f_end - self.f_start
        fp8 = cfg.quantization == "fp8"
        wdt = FP8 if fp8 else dtype
        self.dtype = dtype
        self.w13 = nn.Parameter(torch.empty(n, 2 * fl, h, device=ctx.device, dtype=wdt), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(n, h, fl, device=ctx.device, dtype=wdt), requires_grad=False)
        # FP8 (layers/fp8.py): a float32 scale per output row of every expert; the experts run as one grouped
        # FP8 GEMM on the activations quantised per row where torch has it (Hopper), else one by one through
        # the FP8 linear path (such steps run eagerly, not as graphs)
        self.w13_scale = nn.Parameter(torch.empty(n, 2 * fl, device=ctx.device), requires_grad=False) if fp8 else None
        self.w2_scale = nn.Parameter(torch.empty(n, h, device=ctx.device), requires_grad=False) if fp8 else None
        self._fp8_linear = fp8_path(ctx.device) if fp8 else None
        self.router = nn.Parameter(torch.empty(E, h, device=ctx.device, dtype=dtype), requires_grad=False)
        self.grouped = fp8_grouped_ok(ctx.device, dtype, h, fl) if fp8 else _grouped_mm_usable(ctx.device, dtype, h, fl)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(f"{prefix}.shared_expert", h, cfg.shared_expert_intermediate_size, False,
                                          ctx, dtype, reduce=False, fp8=fp8)
            self.shared_gate = nn.Parameter(torch.empty(1, h, device=ctx.device, dtype=dtype), requires_grad=False)
        # routing statistics: tokens per (logical) expert since the last reset, and rows this rank's
        # experts processed in the current step (read and cleared by the runner after every step)
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.long, device=ctx.device), persistent=False)
        self.rows = torch.zeros((), dtype=torch.long, device=ctx.device)
        self.counts_tokens = self.ep > 1 or ctx.tp_rank == 0  # TP-experts: every rank routes all tokens
        # a step padded to a graph's size: how many of its tokens are real, a device scalar the graph reads
        # (set by the model runner around a graph's forward; None in an eager step, whose tokens all are)
        self.real_tokens: torch.Tensor | None = None

    def fixed_dispatch(self, tokens: int) -> bool:
        """Whether a step of `tokens` tokens dispatches without the host reading row counts: TP experts, or
        EP's fixed-capacity all-to-all (which also carries a graph's padding rows, marked as padding)."""
        return self.ep == 1 or self.ep * -(-tokens // self.ep) * self.top_k <= self.padded_max_rows

    def graph_safe(self, tokens: int) -> bool:
        """Whether a step of `tokens` tokens runs without the host waiting for the GPU, which a CUDA graph
        needs: the local experts as one grouped GEMM and a fixed dispatch."""
        return self.grouped and self.fixed_dispatch(tokens)

    def _padding(self, first: int, n: int, device: torch.device) -> torch.Tensor | None:
        """[n * top_k] True for the routed rows of tokens first .. first + n - 1 that are a graph's padding
        (None in an eager step): they go to no expert and count in no statistic."""
        if self.real_tokens is None:
            return None
        return (torch.arange(first, first + n, device=device) >= self.real_tokens).repeat_interleave(self.top_k)

    # ---- weights ----------------------------------------------------------------------------
    def _expert_names(self, e: int) -> tuple[str, str, str]:
        """the expert's gate, up and down matrices (without the .weight suffix)"""
        p = f"{self.prefix}.experts.{e}"
        if self.mixtral:
            return f"{p}.w1", f"{p}.w3", f"{p}.w2"
        return f"{p}.gate_proj", f"{p}.up_proj", f"{p}.down_proj"

    def load(self, reader: Reader) -> None:
        h, f = self.hidden, self.cfg.moe_intermediate_size
        dev, dt = self.w13.device, self.dtype
        s, t = self.f_start, self.f_end
        self.router.data.copy_(reader.read(f"{self.prefix}.gate.weight", (self.num_experts, h), None, 0, 0, dev, dt))
        for slot, e in enumerate(self.local):
            gate, up, down = self._expert_names(e)
            for rows, name, dim, target, scale in ((slice(0, t - s), gate, 0, self.w13, self.w13_scale),
                                                   (slice(t - s, None), up, 0, self.w13, self.w13_scale),
                                                   (slice(None), down, 1, self.w2, self.w2_scale)):
                shape = (f, h) if dim == 0 else (h, f)
                if scale is None:
                    target.data[slot, rows].copy_(reader.read(f"{name}.weight", shape, dim, s, t, dev, dt))
                else:
                    w, sc = read_fp8(reader, name, shape, dim, s, t, self.ctx, dt)
                    target.data[slot, rows].copy_(w)
                    scale.data[slot, rows].copy_(sc)
        if self.shared_expert is not None:
            self.shared_gate.data.copy_(reader.read(f"{self.prefix}.shared_expert_gate.weight", (1, h), None, 0, 0, dev, dt))

    # ---- compute ----------------------------------------------------------------------------
    def route(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (float32 weights, expert ids) per token, with Hugging Face's softmax/renormalisation. pad:
        the rows (token x k) that are a graph's padding, left out of the statistics."""
        probs = F.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.counts_tokens:
            flat = ids.reshape(-1)
            if pad is None:
                self.tokens_per_expert += count(flat, self.num_experts)
            else:
                self.tokens_per_expert.scatter_add_(0, flat, (~pad).long())
        return weights, ids

    def run_experts(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Row i of x through local expert slot[i]: [rows, hidden] -> [rows, hidden]. Rows whose
        slot is past the local experts (padding) are skipped and come back undefined."""
        n_local = self.w13.shape[0]
        if x.shape[0] == 0 or n_local == 0:  # nothing came, or this rank holds no expert (ep > experts)
            return torch.zeros_like(x)
        order = torch.argsort(slot, stable=True)
        xs = x[order]
        counts = count(slot.clamp(max=n_local), n_local + 1)[:n_local]  # (padding rows: a slot past the local ones)
        self.rows += counts.sum()
        offs = torch.cumsum(counts, 0).to(torch.int32) if self.grouped else None
        if self.grouped and self.w13_scale is not None:  # FP8: e4m3 activations, a scale per row
            from ..kernels.triton_fp8 import quantize_activations

            xq, x_scale = quantize_activations(xs)
            gate, up = fp8_grouped_mm(xq, x_scale.reshape(-1), self.w13, self.w13_scale, offs, xs.dtype).chunk(2, dim=-1)
            hq, h_scale = quantize_activations((F.silu(gate) * up).contiguous())
            ys = fp8_grouped_mm(hq, h_scale.reshape(-1), self.w2, self.w2_scale, offs, xs.dtype)
        elif self.grouped:
            gate, up = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            ys = torch._grouped_mm((F.silu(gate) * up).contiguous(), self.w2.transpose(1, 2), offs=offs)
        else:
            ys = torch.zeros_like(xs)
            start = 0
            for s, n in enumerate(counts.tolist()):
                if n:
                    gate, up = self._expert_linear(xs[start:start + n], self.w13, self.w13_scale, s).chunk(2, dim=-1)
                    ys[start:start + n] = self._expert_linear(F.silu(gate) * up, self.w2, self.w2_scale, s)
                    start += n
        out = torch.empty_like(ys)
        out[order] = ys
        return out

    def _expert_linear(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, s: int) -> torch.Tensor:
        return F.linear(x, w[s]) if scale is None else self._fp8_linear(x, w[s], scale[s])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, k = x.shape[0], self.top_k
        if self.ep > 1:
            out = self._expert_parallel(x)
        else:
            pad = self._padding(0, T, x.device)
            weights, ids = self.route(x, pad)
            tok = torch.arange(T, device=x.device).repeat_interleave(k)
            slot = ids.reshape(-1) if pad is None else ids.reshape(-1).masked_fill(pad, self.num_experts)  # (skipped)
            y = self.run_experts(x[tok], slot)
            out = torch.zeros(T, self.hidden, dtype=torch.float32, device=x.device)
            out.index_add_(0, tok, y.float() * weights.reshape(-1, 1))
        out = out.to(x.dtype)
        if self.shared_expert is not None:  # this rank's slice of the shared expert, gated per token
            out += torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared_expert(x)
        return self.ctx.all_reduce(out)

    def _expert_parallel(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's token rows go out to the experts' ranks and come back combined; other rows are 0."""
        T, k, ep, h = x.shape[0], self.top_k, self.ep, self.hidden
        s0, s1 = split_evenly(T, ep)[self.rank]
        pad = self._padding(s0, s1 - s0, x.device)
        weights, ids = self.route(x[s0:s1], pad)  # [n_tok, k]
        flat = ids.reshape(-1)
        copy = choose_copies(flat, self.copy_count, self.rank)
        dest, slot = self.copy_rank[flat, copy], self.copy_slot[flat, copy]
        if pad is not None:  # a graph's padding rows travel as padding: no expert runs them
            slot = slot.masked_fill(pad, self.slots)
        order = torch.argsort(dest * (self.slots + 1) + slot, stable=True)  # by destination rank, then slot
        tok = torch.div(order, k, rounding_mode="floor")
        rows = x[s0:s1][tok]
        capacity = -(-T // ep) * k  # the most rows any rank can send to one peer
        if faults.armed is not None:  # testing aid: SHARDLM_FAULT_INJECT point=all_to_all
            faults.armed.reached("all_to_all")
        if ep * capacity <= self.padded_max_rows:
            back = self._dispatch_padded(rows, dest[order], slot[order], capacity)
        else:
            back = self._dispatch_variable(rows, dest[order] * self.slots + slot[order])
        out = torch.zeros(T, h, dtype=torch.float32, device=x.device)
        out[s0:s1].index_add_(0, tok, back.float() * weights.reshape(-1)[order].unsqueeze(1))
        return out

    def _dispatch_padded(self, rows: torch.Tensor, dest: torch.Tensor, slot: torch.Tensor,
                         capacity: int) -> torch.Tensor:
        """rows (sorted by dest) through their experts with equal-size all-to-alls; no host sync."""
        ep, h, group = self.ep, self.hidden, self.ctx.tp_group
        per_dest = count(dest, ep)
        first = torch.cumsum(per_dest, 0) - per_dest
        where = dest * capacity + torch.arange(rows.shape[0], device=rows.device) - first[dest]
        send = rows.new_zeros(ep * capacity, h)
        send[where] = rows
        send_slot = torch.full((ep * capacity,), self.slots, dtype=torch.long, device=rows.device)  # padding
        send_slot[where] = slot
        received, recv_slot = torch.empty_like(send), torch.empty_like(send_slot)
        dist.all_to_all_single(received, send, group=group)
        dist.all_to_all_single(recv_slot, send_slot, group=group)
        y = self.run_experts(received, recv_slot)
        back = torch.empty_like(y)
        dist.all_to_all_single(back, y, group=group)
        return back[where]

    def _dispatch_variable(self, rows: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """rows (sorted by key = dest * slots + slot) through their experts, sending exactly the rows."""
        ep, h, group = self.ep, self.hidden, self.ctx.tp_group
        send_counts = count(key, ep * self.slots)  # [ep * slots]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)  # a slots-sized piece per peer
        send_split = send_counts.view(ep, self.slots).sum(1).tolist()  # the host waits here
        recv_split = recv_counts.view(ep, self.slots).sum(1).tolist()
        received = rows.new_empty(sum(recv_split), h)
        dist.all_to_all_single(received, rows.contiguous(), recv_split, send_split, group=group)
        slot = torch.repeat_interleave(torch.arange(self.slots, device=rows.device).repeat(ep), recv_counts)
        y = self.run_experts(received, slot)
        back = rows.new_empty(rows.shape[0], h)
        dist.all_to_all_single(back, y, send_split, recv_split, group=group)
        return back
