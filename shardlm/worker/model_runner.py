"""Model runner: owns this rank's model shard and KV cache, turns a step plan into a forward pass."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import torch

from ..common import envs
from ..common.config import ConfigError
from ..common.messages import (
    PREV_TOKEN,
    PromptLogprobs,
    SeqPlan,
    StepMasks,
    StepPlan,
    StepResult,
)
from ..common.model_source import ModelSource
from .distributed import ParallelContext
from .graphs import DecodeGraphs, capture_all, reset
from .kernels.paged_attention import (
    AttentionMetadata,
    SplitWorkspace,
    build_metadata,
    resolve_backend,
    warm_up,
)
from .layers.attention import PagedAttention
from .layers.fp8 import scaled_mm_ok
from .models.llama import LlamaForCausalLM
from .profiling import Span, StepTimer, synchronize
from .sampler import Penalties, SampleBatch, Sampler
from .step_graphs import StepGraphs
from .weights import open_reader

PROMPT_LOGPROB_ROWS = 512
"""prompt positions whose float32 logits are held at once (prompt_logprobs): 256 MiB at a 128k vocabulary"""


class ModelRunner:
    """This rank's model shard, KV cache, decode graphs and sampler; `execute` runs one StepPlan."""

    def __init__(self, source: ModelSource, ctx: ParallelContext, dtype: torch.dtype, max_model_len: int,
                 block_size: int, expert_placement: list | None, cuda_graphs: bool, max_num_seqs: int,
                 max_seq_len_to_capture: int | None, attention_backend: str = "auto", async_scheduling: bool = False,
                 max_step_tokens: int = 0, kv_cache_dtype: str = "auto"):
        self.source, self.ctx, self.dtype = source, ctx, dtype
        self.kv_dtype = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else dtype
        """the KV cache's element type (FP8: e4m3, scale 1; the attention paths widen it as they read)"""
        self.block_size, self.max_model_len = block_size, max_model_len
        if source.config.quantization == "fp8" and ctx.device.type == "cuda" and not scaled_mm_ok(ctx.device):
            raise ConfigError(f"quantization='fp8' needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper or "
                              f"later); {torch.cuda.get_device_name(ctx.device)} has "
                              f"{'.'.join(map(str, torch.cuda.get_device_capability(ctx.device)))}: load the model "
                              f"without quantization")
        self.model = LlamaForCausalLM(source.config, ctx, dtype, max_positions=max_model_len,
                                      expert_placement=expert_placement)
        # the kernel layer: Triton on CUDA, the torch references elsewhere (worker/kernels/); every module with a
        # kernel path (attention, the norms' residual add, SiLU x up) runs the resolved one
        self.attention_backend = resolve_backend(attention_backend, ctx.device)
        fused = "torch" if envs.unfused() else self.attention_backend
        for m in self.model.modules():
            if hasattr(m, "use"):
                m.use(self.attention_backend if isinstance(m, PagedAttention) else fused)
        self.heads = self.model.attention_layers()[0].heads  # every layer of the stage has the same heads
        cuda = ctx.device.type == "cuda"
        self.sms = torch.cuda.get_device_properties(ctx.device).multi_processor_count if cuda else 0
        # split-KV partials, allocated before the KV cache is sized so that the sizing counts them
        self.attn_workspace = (SplitWorkspace(self.heads.n_q, self.heads.head_dim, ctx.device)
                               if self.attention_backend == "triton" else None)
        self.moe = self.model.moe_layers()
        self.step_rows: deque[torch.Tensor] = deque(maxlen=4096)  # rows this rank's experts ran, per step
        self.sampler = Sampler(ctx.device)
        # the tokens the last step sampled, on the device (rows in plan order; on every rank of the last stage
        # under async scheduling): a plan's PREV_TOKEN is read from here, also inside a decode graph
        self.async_scheduling = async_scheduling
        self.sampled = torch.zeros(max(1, max_num_seqs), dtype=torch.long, device=ctx.device)
        self.sampled_rows: dict[int, int] = {}  # seq id -> its row in self.sampled
        self.block_tables: dict[int, list[int]] = {}  # seq id -> its KV block table (see _complete_block_tables)
        self.num_blocks = 0
        self.scratch_block = 0  # a KV block past the block manager's: padding rows of a graph step write there
        # decode steps as CUDA graphs (on GPU; MoE models where graphs.allows); captured once the KV cache exists
        self.graphs = None
        # (on the CPU only the padding is run, eagerly: a testing aid)
        if cuda_graphs:
            self.graphs = DecodeGraphs(self, max_num_seqs, max_seq_len_to_capture, capture=ctx.device.type == "cuda")
        # steps with prompt chunks as CUDA graphs too, over the attention kernels' varlen tile tables (step_graphs.py)
        self.step_graphs = None
        if cuda_graphs and self.attention_backend == "triton" and not envs.no_step_graphs():
            self.step_graphs = StepGraphs(self, max_num_seqs, max_step_tokens, capture=True)
        self.timer = StepTimer(ctx.device)  # step accounting and trace events

    def load(self, show_progress: bool) -> float:
        """Read this rank's weights; returns seconds taken."""
        t0 = time.perf_counter()
        src = self.source
        reader = open_reader(src.kind, src.path, src.config, src.seed)
        from tqdm import tqdm

        with tqdm(total=src.config.num_hidden_layers, desc=f"loading {src.name}", unit="layer",
                  disable=not show_progress, delay=2.0) as bar:
            self.model.load_weights(reader, progress=bar.update)
        synchronize(self.ctx.device)
        return time.perf_counter() - t0

    # ---- KV cache -------------------------------------------------------------------------
    def block_bytes(self) -> int:
        """Bytes one KV block takes on this rank (K and V, every layer)."""
        layers = self.model.attention_layers()
        per_token = sum(2 * a.n_kv * a.head_dim for a in layers) * self.kv_dtype.itemsize
        return per_token * self.block_size

    def kv_capacity(self, gpu_memory_utilization: float, cpu_kv_cache_bytes: int, profile_tokens: int) -> dict[str, Any]:
        """How many KV blocks fit. On GPU: after weights and a profiling forward of `profile_tokens`."""
        if self.ctx.device.type != "cuda":
            return {"blocks": cpu_kv_cache_bytes // self.block_bytes(), "activation_bytes": 0}
        dev = self.ctx.device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        # the profiling batch: profile_tokens prompt tokens cut into sequences no longer than max_model_len
        lens = [min(self.max_model_len, profile_tokens - i) for i in range(0, profile_tokens, self.max_model_len)]
        per_seq = [-(-n // self.block_size) for n in lens]
        self.allocate_kv(sum(per_seq))
        kv_bytes = torch.cuda.memory_allocated(dev) - before
        first = [sum(per_seq[:i]) for i in range(len(lens))]
        try:  # (the whole step budget: a step the scheduler may send must fit beside the cache)
            self.execute(StepPlan([SeqPlan(-1 - i, [0] * n, 0, list(range(b0, b0 + nb)), sample=True)
                                   for i, (n, b0, nb) in enumerate(zip(lens, first, per_seq))])).finish()
        except torch.cuda.OutOfMemoryError:
            raise ValueError(f"a step of {profile_tokens} tokens (max_num_batched_tokens) does not fit in GPU "
                             f"memory beside the weights: lower max_num_batched_tokens") from None
        synchronize(self.ctx.device)
        activation = torch.cuda.max_memory_allocated(dev) - before - kv_bytes
        # the decode graphs keep a memory pool of their own: capture them once over this temporary cache to
        # measure it (the cache's size is not known before; the real graphs are captured over the real one)
        graph_bytes = sum(capture_all(g)["graph_pool_bytes"] for g in self._graph_sets())
        self.free_kv()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        used_by_others = total - free  # weights, CUDA context, NCCL buffers, other processes
        # the sampler's penalty counts: a row per running penalized sequence (max_num_seqs at most), grown
        # as they come: kept out of the KV cache's share
        penalty_bytes = len(self.sampled) * Penalties.row_bytes(self.source.config.vocab_size)
        budget = int(total * gpu_memory_utilization) - used_by_others - activation - graph_bytes - penalty_bytes
        blocks = max(0, budget // self.block_bytes() - (self.graphs is not None))  # less the scratch block
        return {"blocks": blocks, "activation_bytes": activation, "graph_reserve_bytes": graph_bytes,
                "penalty_reserve_bytes": penalty_bytes,
                "total_bytes": total, "used_bytes": used_by_others}

    def allocate_kv(self, num_blocks: int) -> None:
        """num_blocks for the block manager, plus the scratch block when decode runs as graphs."""
        layers = self.model.attention_layers()
        self.scratch_block = num_blocks
        slots = (num_blocks + (self.graphs is not None)) * self.block_size
        for a in layers:
            a.k_cache = torch.empty(slots, a.n_kv, a.head_dim, device=self.ctx.device, dtype=self.kv_dtype)
            a.v_cache = torch.empty(slots, a.n_kv, a.head_dim, device=self.ctx.device, dtype=self.kv_dtype)
        self.num_blocks = num_blocks

    def capture_graphs(self) -> dict[str, float]:
        """Compile the attention kernels (before the first request, not on it) and capture the decode graphs
        over the KV cache just allocated (nothing to do on the torch path without graphs)."""
        if self.attention_backend == "triton":
            a = self.model.attention_layers()[0]
            warm_up(self.heads, a.k_cache, a.v_cache, self.block_size, self.attn_workspace, self.dtype)
        totals = {"graphs": 0, "capture_s": 0.0, "graph_pool_bytes": 0}
        for g in self._graph_sets():
            for k, v in capture_all(g).items():
                totals[k] += v
        return totals

    def _graph_sets(self) -> list[DecodeGraphs | StepGraphs]:
        """The decode graphs and the mixed-step graphs, those this rank has."""
        return [g for g in (self.graphs, self.step_graphs) if g is not None]

    def free_kv(self) -> None:
        for g in self._graph_sets():
            reset(g)
        for a in self.model.attention_layers():
            a.k_cache = a.v_cache = None
        self.num_blocks = 0

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> PendingStep:
        """Queue one step on the device: every scheduled sequence's new tokens, through this rank's layers.
        Nothing here waits for the device on the last stage (a non-last pipeline stage sends its activations
        on to the next stage, which waits); the returned PendingStep's finish() gives the output rank's
        sampled tokens (None on every other rank)."""
        started = time.perf_counter()
        self.sampler.forget(plan.finished)
        for sid in plan.release:
            self.sampler.penalties.forget(sid)
        self._complete_block_tables(plan)
        if not plan.seqs:
            return PendingStep(self, started, None, None)
        prompt_lps = any(s.prompt_logprobs is not None for s in plan.seqs)  # (needs every position's hidden state)
        graph = None if prompt_lps else self._graph_shape(plan)  # a decode graph's (batch, context)
        mixed = (self.step_graphs.size_for(plan) if graph is None and self.step_graphs is not None and not prompt_lps
                 else None)
        self.timer.step(graph is not None or mixed is not None)
        eager = graph is None and mixed is None
        inputs = self._prepare(plan) if eager else None  # host work done before waiting on a stage
        x = None
        if not self.ctx.is_first_stage:  # the previous stage's activations, in the plan's token order
            with self.timer.span("recv activations", "communication"):
                x = self.ctx.recv_prev_stage((plan.num_tokens, self.source.config.hidden_size), self.dtype)
        last = self.ctx.is_last_stage
        samples = last and any(s.sample for s in plan.seqs)
        name = f"forward {plan.num_tokens} tokens" + ("" if eager else " (graph)") + (" + sample" if samples else "")
        span = self.timer.open(name)
        # the last stage gets the sampled sequences' logits from a graph, its hidden states from the eager model
        if graph is not None:
            out = self.graphs.run(graph, plan, x)
        elif mixed is not None:
            out = self.step_graphs.run(mixed, plan, x)
        else:
            out = self._forward(*inputs, x)
        self._count_expert_rows()
        batch = deferred = None
        prompt = self._prompt_logprobs(plan, out) if prompt_lps and last else []
        if samples:
            logits = self._logits(plan, out) if eager else out
            if plan.masks_follow and self.ctx.is_output_rank:
                deferred = (plan, logits)  # sampled when the masks arrive (PendingStep.take_masks)
            else:
                batch = self._sample(plan, logits)
        span.issued()
        if not last:
            self.timer.close(span)
            with self.timer.span("send activations", "communication"):
                self.ctx.send_next_stage(out)
            span = None
        return PendingStep(self, started, span, batch, deferred, prompt)

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor) -> list[tuple[int, int, list[torch.Tensor]]]:
        """For the sequences that ask (SeqPlan.prompt_logprobs): the LM head over their positions (every rank
        of the last stage: TP gathers the vocabulary), and on the output rank each target's log-probability,
        rank and the k most likely tokens, on the device: (seq_id, start, [logprob, rank, top ids, top
        logprobs]). PROMPT_LOGPROB_ROWS positions at a time bound the float32 logits' memory."""
        out, offset = [], 0
        for s in plan.seqs:
            if s.prompt_logprobs is not None:
                k, targets = s.prompt_logprobs
                want = torch.tensor(targets, dtype=torch.long).to(self.ctx.device, non_blocking=True)
                parts = []
                for a in range(0, len(targets), PROMPT_LOGPROB_ROWS):
                    rows = hidden[offset + a: offset + min(len(targets), a + PROMPT_LOGPROB_ROWS)]
                    logits = self.model.compute_logits(rows).float()
                    if not self.ctx.is_output_rank:
                        continue
                    logits -= torch.logsumexp(logits, dim=-1, keepdim=True)
                    chosen = logits.gather(1, want[a: a + len(rows), None])
                    top_lps, top_ids = torch.topk(logits, min(k, logits.shape[1]), dim=-1)
                    parts.append([chosen[:, 0], (logits > chosen).sum(-1) + 1, top_ids, top_lps])
                if parts:
                    out.append((s.seq_id, s.start, [torch.cat(p) for p in zip(*parts)]))
            offset += len(s.tokens)
        return out

    def _complete_block_tables(self, plan: StepPlan) -> None:
        """The driver sends a sequence's block table once, then only the entries added since: make each
        SeqPlan's `blocks` whole again from the tables kept here (and drop finished sequences' tables).
        Sequences with negative ids are the runner's own plans (profiling, graph warm-up): whole tables."""
        for sid in plan.finished:
            self.block_tables.pop(sid, None)
        for s in plan.seqs:
            if s.seq_id < 0:
                continue
            held = self.block_tables.get(s.seq_id, [])
            if s.blocks_from > len(held):
                raise RuntimeError(f"sequence {s.seq_id}: the plan continues its block table at entry "
                                   f"{s.blocks_from}, but this worker holds {len(held)} entries")
            s.blocks = self.block_tables[s.seq_id] = held[: s.blocks_from] + s.blocks
            s.blocks_from = 0

    def _graph_shape(self, plan: StepPlan) -> tuple[int, int] | None:
        """The captured (batch, context) pair this step replays, or None to run it eagerly: graphs run
        decode steps that fit a pair."""
        if self.graphs is None or not plan.is_decode:
            return None
        return self.graphs.shape_for(len(plan.seqs), max(s.context_len for s in plan.seqs))

    def _prepare(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The eager forward's inputs: token ids (on the device: a PREV_TOKEN is read from the last step's
        sampled tokens), positions and attention metadata."""
        seqs = plan.seqs
        ids = [t for s in seqs for t in s.tokens]
        positions = torch.cat([torch.arange(s.start, s.context_len) for s in seqs])
        meta = build_metadata([s.start for s in seqs], [len(s.tokens) for s in seqs], [s.blocks for s in seqs],
                              self.block_size, self.ctx.device, self.dtype, self.attention_backend, self.heads, self.sms)
        meta.workspace = self.attn_workspace
        dev = self.ctx.device
        if PREV_TOKEN not in ids:
            return torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True), positions, meta
        src = self.prev_rows(seqs)
        both = torch.tensor([ids, [r for s, r in zip(seqs, src) for _ in s.tokens]], dtype=torch.long)
        ids_dev, src_dev = both.to(dev, non_blocking=True)
        return self.resolve_prev(ids_dev, src_dev), positions, meta

    def prev_rows(self, seqs: list[SeqPlan]) -> list[int]:
        """Per sequence: the row of self.sampled its PREV_TOKEN reads, or -1 (its token is in the plan)."""
        rows = []
        for s in seqs:
            if s.tokens[0] != PREV_TOKEN:
                rows.append(-1)
            elif len(s.tokens) != 1 or s.seq_id not in self.sampled_rows:
                raise RuntimeError(f"sequence {s.seq_id}: the plan asks for the token sampled in the previous step "
                                   f"(PREV_TOKEN), but that step did not sample it on this worker")
            else:
                rows.append(self.sampled_rows[s.seq_id])
        return rows

    def resolve_prev(self, ids: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """ids with each entry whose src row is >= 0 replaced by that row of the last step's sampled tokens
        (device operations only: graph-safe, no wait for the previous step)."""
        return torch.where(src >= 0, self.sampled[src.clamp(min=0)], ids)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 x: torch.Tensor | None) -> torch.Tensor:
        """The eager forward: hidden states [tokens, hidden] of every new token (x: a previous stage's)."""
        return self.model(ids if x is None else x, positions.to(self.ctx.device, non_blocking=True), meta)

    def _logits(self, plan: StepPlan, hidden: torch.Tensor) -> torch.Tensor:
        """[sampled sequences, vocab] float32: the LM head over each sampled sequence's last new token."""
        last = np.cumsum([len(s.tokens) for s in plan.seqs]) - 1  # flat index of each sequence's last token
        rows = [i for i, s in enumerate(plan.seqs) if s.sample]
        index = torch.from_numpy(last[rows]).to(self.ctx.device, non_blocking=True)  # (a blocking copy would wait)
        return self.model.compute_logits(hidden.index_select(0, index))

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> SampleBatch | None:
        """The output rank samples a token for each sequence that asks (the logits' rows, in plan order) and
        keeps the tokens on the device for the next step's PREV_TOKENs; under async scheduling with TP the
        other ranks of the last stage receive them (they took part in the LM head's all-gather)."""
        rows = [s for s in plan.seqs if s.sample]
        n = len(rows)
        if n > len(self.sampled):  # only the runner's own plans (the profiling forward) sample more rows
            self.sampled_rows = {}
            return self.sampler.sample(logits, rows, plan.masks) if self.ctx.is_output_rank else None
        batch = None
        if self.ctx.is_output_rank:
            batch = self.sampler.sample(logits, rows, plan.masks)
            if plan.return_logits:  # a graph's logits buffer is rewritten by the next step: keep a copy
                batch.logits = logits.clone()
            self.sampled[:n].copy_(batch.tokens)
        if self.async_scheduling and self.ctx.tp_group is not None:
            self.ctx.broadcast_from_output_rank(self.sampled[:n])
        self.sampled_rows = {s.seq_id: i for i, s in enumerate(rows)}
        return batch

    def _count_expert_rows(self) -> None:
        if self.moe:  # a device scalar per step: read when the stats are asked for, not now
            self.step_rows.append(sum(m.rows for m in self.moe.values()))  # a new tensor: 0 + rows + ...
            for m in self.moe.values():
                m.rows.zero_()

    # ---- statistics -------------------------------------------------------------------------
    def reset_expert_stats(self) -> None:
        self.step_rows.clear()
        for m in self.moe.values():
            m.tokens_per_expert.zero_()

    def save_expert_stats(self) -> tuple[dict[int, torch.Tensor], int]:
        return {i: m.tokens_per_expert.clone() for i, m in self.moe.items()}, len(self.step_rows)

    def restore_expert_stats(self, saved: tuple[dict[int, torch.Tensor], int]) -> None:
        counts, steps = saved
        for i, m in self.moe.items():
            m.tokens_per_expert.copy_(counts[i])
            m.rows.zero_()  # (rows of forwards not counted as a step yet: those being undone)
        while len(self.step_rows) > steps:
            self.step_rows.pop()

    def accounting(self) -> dict[str, Any]:
        """The step timer's accounting since its last reset, and the MoE routing since the last expert reset."""
        out = self.timer.accounting()
        if self.moe:  # routing: tokens per expert (each token counted once over the TP group)
            out["moe"] = {"tokens_per_expert": {i: m.tokens_per_expert.tolist() for i, m in self.moe.items()
                                                if m.counts_tokens},
                          # one device read for all steps (int() of each would wait on the GPU per step)
                          "step_rows": torch.stack(list(self.step_rows)).tolist() if self.step_rows else []}
        return out


class PendingStep:
    """A step queued on the device. `finish()` waits for it and returns the output rank's StepResult (None on
    the other ranks); `ready()` says whether that would wait. Under async scheduling the worker launches the
    next plan before it finishes this one, so the device never waits for the host in between."""

    def __init__(self, runner: ModelRunner, started: float, span: Span | None, batch: SampleBatch | None,
                 deferred: tuple[StepPlan, torch.Tensor] | None = None,
                 prompt: list[tuple[int, int, list[torch.Tensor]]] | None = None):
        self.runner, self.span, self.batch = runner, span, batch
        self.prompt = prompt or []
        """ModelRunner._prompt_logprobs' tensors (output rank), copied out in finish()"""
        self.started = started
        """time.perf_counter() when execute() began: the step's exec_s counts from here"""
        self.deferred = deferred
        """(plan, logits) of a step whose sampling waits for its masks (StepPlan.masks_follow)"""
        self.event = None
        if deferred is None:
            self._record()

    def _record(self) -> None:
        if self.span is not None and self.runner.ctx.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    @property
    def awaits_masks(self) -> bool:
        return self.deferred is not None

    def take_masks(self, msg: StepMasks) -> None:
        """Sample the step with the masks that followed its plan (the forward may still be running)."""
        plan, logits = self.deferred
        plan.masks, unban = msg.masks, set(msg.unban)
        for s in plan.seqs:
            if s.seq_id in unban:
                s.ban = None
        self.batch, self.deferred = self.runner._sample(plan, logits), None
        self._record()

    def ready(self) -> bool:
        return self.deferred is None and (self.event is None or self.event.query())

    def finish(self) -> StepResult | None:
        if self.deferred is not None:
            raise RuntimeError("a step finished before the masks its plan announced (StepPlan.masks_follow)")
        if self.event is not None:
            self.event.synchronize()
        if self.span is not None:
            self.runner.timer.close(self.span)
        if not self.runner.ctx.is_output_rank:
            return None
        prompt = [PromptLogprobs(sid, start, *(t.cpu().numpy() for t in ts)) for sid, start, ts in self.prompt]
        if self.batch is None:  # a step of prompt chunks samples nothing
            return StepResult([], prompt_logprobs=prompt)
        logits = self.batch.logits
        return StepResult(self.batch.result(), logits=None if logits is None else logits.cpu().numpy(),
                          prompt_logprobs=prompt)
