"""Steps that carry prompt chunks, replayed as CUDA graphs (the Triton attention path).

A loaded server's steps mix decodes with prompt chunks; run eagerly, each launches ~35 kernels a layer
from Python (~6-9 ms of host time for an 8B model), more than the GPU needs for a step of a few hundred
tokens. Here the whole forward of such a step, embedding to logits, is captured once per token count
`T` of `MIXED_SIZES` and replayed with one launch. The varlen attention kernels make that possible: the
metadata of any mix of sequences fits fixed-size tensors.

A step of t tokens and n sequences runs at the smallest T >= t with n <= seqs(T) = min(T, max_num_seqs):
- tokens t .. T-1 are padding: token 0 at position 0, their K/V written into the scratch block; no
  attention tile reads them and no logits row is taken from them (rows never mix, so they stay apart);
- sequence slots n .. seqs(T)-1 are empty: no tile names them;
- the attention tile tables (paged_attention.Launch) are as long as any step of the size can need,
  unused tiles -1 (the kernel returns at once). The small tiles (decodes, short chunks) are split-KV
  over the graph's longest context, a fixed split length: parts past a sequence's context are empty
  and weigh nothing in the combine.
Steps with more tokens than the largest size (their GPU time far exceeds the host's launch time), or a
context past `max_context`, run eagerly; so does the torch attention path, and MoE models unless
graphs.allows says otherwise.

The host fills one int64 buffer per step (`_fill`, one copy): ids, positions, the rows of PREV_TOKENs
(async scheduling), cache slots, each sampled sequence's last token, the per-sequence starts and query
offsets, both tile tables and the block tables. The graph turns them into the kernels' int32 metadata.
All graphs share one memory pool (graphs.capture_all captures them); the logits go into one output buffer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..common.graph_shapes import MIXED_MAX_CONTEXT, MIXED_SIZES
from ..common.messages import SeqPlan, StepPlan
from .graphs import allows, padded_tokens
from .kernels.paged_attention import (
    BLOCK_N,
    LARGE_M,
    MAX_SPLITS,
    SMALL_M,
    SPLIT_ROWS,
    AttentionMetadata,
    Launch,
    split_parts,
    tile_tables,
)


def _r4(n: int) -> int:
    return n + (-n % 4)


class StepGraphs:
    """One rank's mixed-step graphs. The model runner asks `size_for` a step and, if it gets a size, calls `run`."""

    programmatic = False
    """captured without programmatic dependent launch: with it, steps with prompt tokens took longer
    (kernels/__init__.py)"""

    def __init__(self, runner: Any, max_num_seqs: int, max_tokens: int, capture: bool):
        self.runner, self.capture = runner, capture
        self.model, ctx = runner.model, runner.ctx
        self.first, self.last = ctx.is_first_stage, ctx.is_last_stage
        self.block_size = runner.block_size
        self.max_num_seqs = max_num_seqs
        self.max_context = min(runner.max_model_len, MIXED_MAX_CONTEXT)
        # up to the first size that holds the step budget (a step never has more tokens), and no size whose
        # tokens its sequence slots cannot hold at the longest context
        sizes = [t for t in MIXED_SIZES if t < max_tokens] + [t for t in MIXED_SIZES if t >= max_tokens][:1]
        self.sizes = [t for t in sizes if self.seqs(t) * self.max_context >= t and allows(runner, t, capture)]
        self.width = -(-self.max_context // self.block_size)  # block table entries per sequence
        heads = runner.heads
        self.small_q = max(1, SMALL_M // heads.g_pad)  # new tokens a small tile holds
        self.large_q = max(1, LARGE_M // heads.g_pad)
        self.small_m, self.large_m = max(SMALL_M, heads.g_pad), max(LARGE_M, heads.g_pad)
        cfg, dev, dtype = runner.source.config, ctx.device, runner.dtype
        biggest = max(self.sizes, default=0)
        self.index = torch.zeros(max((self._layout(t)["end"] for t in self.sizes), default=0), dtype=torch.long,
                                 device=dev)
        self.hidden_in = None if self.first else torch.zeros(biggest, cfg.hidden_size, dtype=dtype, device=dev)
        self.out = (torch.zeros(self.seqs(biggest), cfg.vocab_size, dtype=torch.float32, device=dev) if self.last
                    else torch.zeros(biggest, cfg.hidden_size, dtype=dtype, device=dev))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    # ---- shapes ---------------------------------------------------------------------------
    def seqs(self, t: int) -> int:
        """Sequence slots of a step of t tokens."""
        return min(t, self.max_num_seqs)

    def _tiles(self, t: int) -> tuple[int, int]:
        """(small tiles, large tiles) a step of t tokens may need: a small tile per sequence; the large
        tiles of t tokens, plus one partial tile per sequence."""
        s = self.seqs(t)
        return _r4(s), _r4(-(-t // self.large_q) + s)

    def _splits(self, t: int) -> tuple[int, int]:
        """(parts, positions per part) of the small tiles' split-KV at t tokens, over the longest context."""
        c = self.max_context
        return split_parts(c, min(MAX_SPLITS, SPLIT_ROWS // t, -(-c // (8 * BLOCK_N))), BLOCK_N)

    def _layout(self, t: int) -> dict[str, int]:
        """Offsets of the buffer's fields at t tokens (each int32 field converted inside the graph)."""
        s = self.seqs(t)
        small, large = self._tiles(t)
        out, at = {}, 0
        for name, n in (("ids", t), ("pos", t), ("src", t), ("slots", t), ("real", 1), ("last", s), ("starts", s),
                        ("qstart", s + 1), ("small_seq", small), ("small_q0", small), ("large_seq", large),
                        ("large_q0", large), ("tables", s * self.width)):
            out[name] = at
            at += n
        out["end"] = at
        return out

    def size_for(self, plan: StepPlan) -> int | None:
        """The token count to run this step at (None: run it eagerly)."""
        if not self.graphs and self.capture:
            return None
        t, n = plan.num_tokens, len(plan.seqs)
        if max(s.context_len for s in plan.seqs) > self.max_context:
            return None
        return next((size for size in self.sizes if size >= t and self.seqs(size) >= n), None)

    # ---- one step ---------------------------------------------------------------------------
    def _field(self, lay: dict[str, int], name: str, n: int) -> torch.Tensor:
        return self.index[lay[name]: lay[name] + n]

    def _forward(self, t: int) -> None:
        """The captured work: reads only the input buffers, writes only self.out."""
        runner, lay, s = self.runner, self._layout(t), self.seqs(t)
        small, large = self._tiles(t)
        i32 = torch.int32
        splits, split_len = self._splits(t)
        meta = AttentionMetadata(
            slot_mapping=self._field(lay, "slots", t),
            block_tables=self._field(lay, "tables", s * self.width).view(s, self.width).to(i32),
            seq_starts=self._field(lay, "starts", s).to(i32), query_start=self._field(lay, "qstart", s + 1).to(i32),
            max_ctx=self.max_context, decode_only=False, block_size=self.block_size,
            launches=[Launch(self._field(lay, "small_seq", small).to(i32), self._field(lay, "small_q0", small).to(i32),
                             self.small_m, splits, split_len),
                      Launch(self._field(lay, "large_seq", large).to(i32), self._field(lay, "large_q0", large).to(i32),
                             self.large_m)],
            workspace=runner.attn_workspace)
        ids = self._field(lay, "ids", t)
        if not self.first:
            x = self.hidden_in[:t]
        elif runner.async_scheduling:
            x = runner.resolve_prev(ids, self._field(lay, "src", t))
        else:
            x = ids
        with padded_tokens(runner, self.index[lay["real"]]):
            hidden = self.model(x, self._field(lay, "pos", t), meta)
        if self.last:
            self.out[:s].copy_(self.model.compute_logits(hidden.index_select(0, self._field(lay, "last", s))))
        else:
            self.out[:t].copy_(hidden)

    def _fill(self, t: int, seqs: list[SeqPlan]) -> None:
        """Copy one step's inputs, padded to t tokens and seqs(t) sequences, into the buffer (one copy)."""
        lay, bs = self._layout(t), self.block_size
        host = np.zeros(lay["end"], dtype=np.int64)

        def put(name: str, values) -> None:
            values = np.asarray(values, dtype=np.int64)
            host[lay[name]: lay[name] + values.size] = values

        q_lens = np.array([len(s.tokens) for s in seqs])
        starts = np.array([s.start for s in seqs])
        n_tok = int(q_lens.sum())
        qstart = np.concatenate([[0], np.cumsum(q_lens)])
        flat_seq = np.repeat(np.arange(len(seqs)), q_lens)
        pos = np.repeat(starts - qstart[:-1], q_lens) + np.arange(n_tok)  # each token's position
        tables = host[lay["tables"]: lay["tables"] + self.seqs(t) * self.width].reshape(-1, self.width)
        for row, s in zip(tables, seqs):  # (a table may run past the context: only its first entries matter)
            k = min(len(s.blocks), self.width)
            row[:k] = s.blocks[:k]
        put("ids", [tok for s in seqs for tok in s.tokens])
        put("pos", pos)
        if self.first and self.runner.async_scheduling:
            host[lay["src"]: lay["src"] + t] = -1
            put("src", np.repeat(self.runner.prev_rows(seqs), q_lens))
        slots = np.full(t, self.runner.scratch_block * bs, dtype=np.int64)  # padding tokens: the scratch block
        slots[:n_tok] = tables[flat_seq, pos // bs] * bs + pos % bs
        put("slots", slots)
        put("real", [n_tok])
        put("last", [qstart[i + 1] - 1 for i, s in enumerate(seqs) if s.sample])  # logits rows: sampled ones
        put("starts", starts)
        put("qstart", np.concatenate([qstart, np.full(self.seqs(t) - len(seqs), n_tok)]))
        small, large = self._tiles(t)
        is_small = q_lens <= self.small_q
        for name, seqs_of, block_q, cap in (("small", np.flatnonzero(is_small), self.small_q, small),
                                            ("large", np.flatnonzero(~is_small), self.large_q, large)):
            host[lay[f"{name}_seq"]: lay[f"{name}_seq"] + cap] = -1  # unused tiles
            tile_seq, tile_q0 = tile_tables(q_lens, seqs_of, block_q)  # the eager step's tables
            put(f"{name}_seq", tile_seq)
            put(f"{name}_q0", tile_q0)
        self.index[: host.size].copy_(torch.from_numpy(host), non_blocking=True)

    def run(self, t: int, plan: StepPlan, x: torch.Tensor | None) -> torch.Tensor:
        """One step of `plan` at t tokens; x: the previous stage's activations (not on the first stage).
        Returns the sampled sequences' logits [sampled, vocab] float32 on the last stage (plan order), else
        the hidden states [plan tokens, hidden]."""
        self._fill(t, plan.seqs)
        if x is not None:
            self.hidden_in[: x.shape[0]].copy_(x)
        if t in self.graphs:
            self.graphs[t].replay()
        else:
            self._forward(t)
        if self.last:
            return self.out[: sum(s.sample for s in plan.seqs)]
        return self.out[: plan.num_tokens]

    # ---- capture -------------------------------------------------------------------------
    def _warm_up_plan(self, t: int) -> list[SeqPlan]:
        """Sequences of t tokens in all, none longer than the longest context, writing the scratch block (valid
        indices for a capture's warm-up)."""
        plan, c = [], self.max_context
        for i, first in enumerate(range(0, t, c)):
            n = min(c, t - first)
            plan.append(SeqPlan(-1 - i, [0] * n, 0, [self.runner.scratch_block] * -(-n // self.block_size), True))
        return plan

    def _capture_order(self) -> list[int]:
        return sorted(self.sizes, reverse=True)

    def _prepare_warm_up(self, t: int) -> None:
        self._fill(t, self._warm_up_plan(t))

    def _out_of_memory(self, t: int) -> str:
        return (f"capturing the mixed-step CUDA graphs ({t} tokens) ran out of GPU memory: lower "
                f"gpu_memory_utilization or max_num_seqs, or set enforce_eager")
