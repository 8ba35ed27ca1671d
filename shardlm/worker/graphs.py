"""Decode steps replayed as CUDA graphs.

A decode step launches the same few hundred small kernels every time. Issued one by one from Python,
the host needs longer to queue them than the GPU needs to run them at small batch, and the step time
then follows how busy the host is (docs/PERFORMANCE.md). Here the whole decode forward, embedding to
logits, is captured once per shape and replayed with one launch.

A graph fixes every shape, so each step is padded to a captured (batch, context) pair (graph_shapes.py):
- batch: rows past the real sequences decode token 0 at position 0 into a scratch KV block that no
  sequence owns (the runner allocates it past the block manager's blocks); their logits are dropped;
- context: the block tables are as wide as the pair's context size (padded with the scratch block). The
  attention kernels read only each sequence's own context; the torch path gathers all of the pair's
  positions and masks out those past a sequence's context.
A step larger than every pair runs eagerly, and so does a step with prompt chunks unless a mixed-step
graph holds it (step_graphs.py). MoE models keep only the pairs `allows` lets through.

All graphs share one memory pool; they never run at once. They read the input buffers below and write
their result into one output buffer, so nothing but the pool grows with the number of graphs.
`capture=False` runs the same padded step eagerly: the padding is then tested on the CPU.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from ..common import envs
from ..common.defaults import MAX_SEQ_LEN_TO_CAPTURE
from ..common.graph_shapes import graph_pairs, padded_shape
from ..common.messages import SeqPlan, StepPlan
from .kernels import pdl_launches
from .kernels.paged_attention import Launch, decode_launch, decode_metadata

if TYPE_CHECKING:
    from .step_graphs import StepGraphs


class DecodeGraphs:
    """One rank's decode graphs. The model runner asks `shape_for` a step and, if it gets a pair, calls `run`.

    A graph's inputs are the token ids, the positions (each sequence's context so far), the rows of the
    last step's sampled tokens that PREV_TOKENs read (-1: the id is given; async scheduling) and the block
    tables ([batch, context / block_size], padded with the scratch block): one int64 buffer the host fills
    with one copy. The attention metadata is computed from them inside the graph (decode_metadata).
    Captured with programmatic dependent launch (kernels.pdl_launches).
    """

    programmatic = True
    """capture_all captures these graphs within kernels.pdl_launches (StepGraphs: not)"""

    def __init__(self, runner: Any, max_num_seqs: int, max_context: int | None, capture: bool):
        self.runner, self.capture = runner, capture
        self.model, ctx = runner.model, runner.ctx
        self.first, self.last = ctx.is_first_stage, ctx.is_last_stage
        self.block_size = runner.block_size
        kernels = runner.attention_backend == "triton"
        if max_context is None:  # the kernels' graphs reach every context; the torch path's gather is bounded
            max_context = runner.max_model_len if kernels else MAX_SEQ_LEN_TO_CAPTURE
        self.pairs = [p for p in graph_pairs(max_num_seqs, min(max_context, runner.max_model_len), kernels)
                      if allows(runner, p[0], capture)]
        self.max_batch = max((b for b, _ in self.pairs), default=0)
        table_cells = max((b * self._blocks(c) for b, c in self.pairs), default=0)
        dev, dtype, cfg = ctx.device, runner.dtype, runner.source.config
        bmax = self.max_batch
        # [ids | positions | PREV_TOKEN rows | real rows (1) | block tables], filled by one copy per step
        self.index = torch.zeros(3 * bmax + 1 + table_cells, dtype=torch.long, device=dev)
        self.hidden_in = None if self.first else torch.zeros(bmax, cfg.hidden_size, dtype=dtype, device=dev)
        self.out = (torch.zeros(bmax, cfg.vocab_size, dtype=torch.float32, device=dev) if self.last
                    else torch.zeros(bmax, cfg.hidden_size, dtype=dtype, device=dev))
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.launches: dict[tuple[int, int], Launch] = {}  # the attention kernels' static tile tables per pair
        self.pool = None

    def _blocks(self, c: int) -> int:
        return -(-c // self.block_size)

    # ---- choosing a pair ------------------------------------------------------------------
    def shape_for(self, n_seqs: int, max_context: int) -> tuple[int, int] | None:
        """The pair to run n_seqs sequences of up to max_context tokens at (None: run eagerly)."""
        return padded_shape(self.pairs, n_seqs, max_context)

    # ---- one step ---------------------------------------------------------------------------
    def _forward(self, shape: tuple[int, int]) -> None:
        """The captured work: reads only the input buffers, writes only self.out."""
        b, c = shape
        bmax, bs, nb = self.max_batch, self.block_size, self._blocks(c)
        positions = self.index[bmax: bmax + b]
        tables = self.index[3 * bmax + 1: 3 * bmax + 1 + b * nb].view(b, nb)
        runner = self.runner
        launch = None
        if runner.attention_backend == "triton":  # made by the warm-up run before a capture, then reused
            if (b, c) not in self.launches:
                self.launches[(b, c)] = decode_launch(b, runner.heads, c, positions.device, runner.sms)
            launch = self.launches[(b, c)]
        meta = decode_metadata(positions, tables, bs, c, runner.dtype, runner.attention_backend, launch)
        meta.workspace = runner.attn_workspace
        if not self.first:
            x = self.hidden_in[:b]
        elif runner.async_scheduling:
            x = runner.resolve_prev(self.index[:b], self.index[2 * bmax: 2 * bmax + b])
        else:
            x = self.index[:b]
        with padded_tokens(runner, self.index[3 * bmax]):
            hidden = self.model(x, positions, meta)
        self.out[:b].copy_(self.model.compute_logits(hidden) if self.last else hidden)

    def _fill(self, b: int, c: int, plan: StepPlan) -> None:
        """Copy one step's inputs, padded to b rows and c context positions, into the buffer (one copy).
        Padding rows decode token 0 at position 0 into the scratch block."""
        bmax, nb, seqs = self.max_batch, self._blocks(c), plan.seqs
        host = np.zeros(3 * bmax + 1 + b * nb, dtype=np.int64)
        if self.first:
            host[: len(seqs)] = [s.tokens[0] for s in seqs]
            if self.runner.async_scheduling:
                host[2 * bmax: 3 * bmax] = -1
                host[2 * bmax: 2 * bmax + len(seqs)] = self.runner.prev_rows(seqs)
        host[bmax: bmax + len(seqs)] = [s.start for s in seqs]
        host[3 * bmax] = len(seqs)
        grid = host[3 * bmax + 1:].reshape(b, nb)
        grid.fill(self.runner.scratch_block)
        for row, s in zip(grid, seqs):  # (a table may run past the context: only nb blocks are read)
            k = min(len(s.blocks), nb)
            row[:k] = s.blocks[:k]
        self.index[: host.size].copy_(torch.from_numpy(host), non_blocking=True)

    def run(self, shape: tuple[int, int], plan: StepPlan, x: torch.Tensor | None) -> torch.Tensor:
        """One decode step of `plan` on pair `shape`; x: the previous stage's activations (not on the first
        stage). Returns [len(plan.seqs), vocab] float32 logits on the last stage, else [len(plan.seqs), hidden]."""
        b, c = shape
        n = len(plan.seqs)
        self._fill(b, c, plan)
        if x is not None:
            self.hidden_in[:n].copy_(x)
        if shape in self.graphs:
            self.graphs[shape].replay()
        else:
            self._forward(shape)
        return self.out[:n]

    def replay_us(self, shape: tuple[int, int], iters: int) -> float:
        """GPU microseconds of one replay of `shape`'s captured graph on its warm-up inputs (every row decoding
        at position 0 into the scratch block: attention over one key), the mean of `iters` replays back to back
        (no host work between them). Every rank of a TP group must call it together: the graph holds the
        group's all-reduces. Leaves the engine's state as a step would (the output buffer, the scratch block),
        an MoE model's expert statistics as they were (the rows routed here are dummies)."""
        self._prepare_warm_up(shape)
        graph = self.graphs[shape]
        saved = self.runner.save_expert_stats()
        try:
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                graph.replay()
            end.record()
            end.synchronize()
        finally:
            self.runner.restore_expert_stats(saved)
        return start.elapsed_time(end) * 1e3 / iters

    def _warm_up_plan(self, b: int) -> StepPlan:
        """A decode step of b sequences that all write the scratch block: what a capture runs first."""
        return StepPlan([SeqPlan(-1 - i, [0], 0, [self.runner.scratch_block], sample=True) for i in range(b)])

    # ---- capture -------------------------------------------------------------------------
    def _capture_order(self) -> list[tuple[int, int]]:
        return sorted(self.pairs, key=lambda p: p[0] * p[1], reverse=True)

    def _prepare_warm_up(self, shape: tuple[int, int]) -> None:
        self._fill(*shape, self._warm_up_plan(shape[0]))

    def _out_of_memory(self, shape: tuple[int, int]) -> str:
        return (f"capturing the decode CUDA graphs (batch {shape[0]}, context {shape[1]}) ran out of GPU memory: "
                f"lower gpu_memory_utilization, max_num_seqs or max_seq_len_to_capture, or set enforce_eager")


def allows(runner: Any, tokens: int, capture: bool) -> bool:
    """Whether a graph of `tokens` rows may hold the model's steps. Dense models: yes. MoE models: when every
    MoE layer dispatches with fixed sizes (a graph's padding rows then travel as padding) and, for a CUDA
    capture, runs its experts as one grouped GEMM (nothing waits for the GPU); SHARDLM_NO_MOE_GRAPHS=1 says no."""
    moe = list(runner.moe.values())
    if not moe:
        return True
    if not all(m.fixed_dispatch(tokens) for m in moe):
        return False
    return not capture or (not envs.no_moe_graphs() and all(m.grouped for m in moe))


@contextmanager
def padded_tokens(runner: Any, real: torch.Tensor) -> Iterator[None]:
    """While a graph's forward is built: MoE layers know how many of its rows are real (a device scalar in
    the graph's input buffer), so padding rows go to no expert and count in no statistic."""
    for m in runner.moe.values():
        m.real_tokens = real
    try:
        yield
    finally:
        for m in runner.moe.values():
            m.real_tokens = None


def capture_all(graphs: DecodeGraphs | StepGraphs) -> dict[str, float]:
    """Capture every shape of a graph set, largest first (the pool is sized by the first), each after a warm-up
    run on a side stream (libraries set up their handles, kernels compile). Needs the KV cache allocated: the
    graphs hold its addresses. Returns how many, the seconds taken and the bytes their pool holds."""
    graphs.graphs.clear()
    order = graphs._capture_order()
    if not graphs.capture or not order:
        return {"graphs": 0, "capture_s": 0.0, "graph_pool_bytes": 0}
    t0 = time.perf_counter()
    dev = graphs.runner.ctx.device
    graphs.pool = torch.cuda.graph_pool_handle()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(dev)
    saved = graphs.runner.save_expert_stats()  # the warm-up runs route dummy tokens: not in the statistics
    try:
        with torch.inference_mode():
            for shape in order:
                graphs._prepare_warm_up(shape)  # valid indices for the warm-up run
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side), _launches(graphs):
                    graphs._forward(shape)
                torch.cuda.current_stream(dev).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=graphs.pool), _launches(graphs):
                    graphs._forward(shape)
                graphs.graphs[shape] = graph
    except torch.cuda.OutOfMemoryError as exc:
        reset(graphs)
        # a ValueError reaches the user as the message alone, naming what to change
        raise ValueError(f"{graphs._out_of_memory(shape)} ({str(exc).splitlines()[0]})") from exc
    finally:
        graphs.runner.restore_expert_stats(saved)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()  # the warm-ups' blocks; the graphs' pool stays
    return {"graphs": len(graphs.graphs), "capture_s": time.perf_counter() - t0,
            "graph_pool_bytes": torch.cuda.memory_reserved(dev) - before}


def _launches(graphs: DecodeGraphs | StepGraphs):
    return pdl_launches() if graphs.programmatic else nullcontext()


def reset(graphs: DecodeGraphs | StepGraphs) -> None:
    """Forget a graph set's graphs (the KV cache they point into is going away); their pool goes with them."""
    graphs.graphs.clear()
    graphs.pool = None
    if graphs.capture:
        torch.cuda.empty_cache()
