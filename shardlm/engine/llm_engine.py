"""The engine (driver process): requests, tokenizer, scheduler and KV blocks; workers do the forward passes.

(Past 400 lines: the requests, the batches in flight and the replacement of a failed worker group share
one state that is simplest to read in one class; output processing, KV sizing, statistics and the
restart bookkeeping live in their own modules.)
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import time
import warnings
from collections import Counter, deque
from typing import Any

from ..common.config import ConfigError
from ..common.layout import LayoutError, ParallelLayout, shard_heads, split_layers
from ..common.messages import (
    PREV_TOKEN,
    AllocateKV,
    Command,
    ProfileStep,
    SeqPlan,
    Stats,
    StepMasks,
    StepPlan,
    WorkerOptions,
)
from ..common.model_source import ModelSource, resolve_model
from .arg_utils import EngineArgs
from .block_manager import BlockManager
from .executor import Executor, WorkerError
from .kv_cache import (
    CPU_KV_CACHE_BYTES,
    KVCacheSize,
    available_host_bytes,
    check_host_memory,
    size_kv_cache,
    token_budget,
    worker_budget,
)
from .moe_placement import plan_placement
from .output_processor import OutputProcessor
from .recovery import Recovery
from .sampling_params import SamplingError, SamplingParams
from .scheduler import ScheduledSeq, Scheduler
from .sequence import RequestMetrics, RequestOutput, Sequence
from .stats import EngineStats, expert_report, write_trace
from .stragglers import check_workers
from .structured import Grammars
from .tokenizer import load_tokenizer

log = logging.getLogger("shardlm.engine")


def _allows_other_than(mask_row, banned: list[int]) -> bool:
    """Whether a bitmask row (32 tokens a word) allows a token not in `banned`."""
    import numpy as np

    words = mask_row.copy()
    for t in banned:
        words[t // 32] &= ~np.int32(1 << (t % 32)) if t % 32 < 31 else np.int32(0x7FFFFFFF)
    return bool(words.any())


def visible_gpus() -> int:
    """GPUs torch can see (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA install simply means no GPU
        return 0


def resolve_device(device: str) -> str:
    """'cuda' or 'cpu' for EngineArgs.device ('auto': cuda when a GPU is visible)."""
    if device == "auto":
        return "cuda" if visible_gpus() > 0 else "cpu"
    if device == "cuda" and visible_gpus() == 0:
        raise ConfigError("device='cuda' but no GPU is visible; use device='cpu'")
    return device


def _max_cpu_workers() -> int:
    return max(8, 2 * (os.cpu_count() or 1))


class LLMEngine:
    """The driver: takes requests, schedules their tokens into steps, sends each step to the workers as a
    StepPlan and turns the StepResult into text (OutputProcessor). One step per `step()` call."""

    def __init__(self, args: EngineArgs):
        args.validate()
        self.args = args
        source = resolve_model(args.model, seed=args.seed, download_dir=args.download_dir)
        source.config.validate()
        self.source: ModelSource = source
        cfg = source.config
        if args.quantization is not None:  # (an FP8 checkpoint says so itself)
            cfg.quantization = args.quantization
            cfg.check_engine_support(source.name)
        if args.fp8_lm_head and cfg.quantization != "fp8":
            raise ConfigError(f"fp8_lm_head puts the LM head in FP8 beside FP8 weights; {source.name} is not an FP8 "
                              f"checkpoint: add quantization='fp8' (--quantization fp8) or drop fp8_lm_head")
        cfg.fp8_lm_head = args.fp8_lm_head
        if args.enable_expert_parallel and not cfg.is_moe:
            raise ConfigError(f"enable_expert_parallel needs a mixture-of-experts model; {source.name} "
                              f"({cfg.model_type}) is dense: drop enable_expert_parallel")
        ep = args.tensor_parallel_size if args.enable_expert_parallel else 1
        self.layout = ParallelLayout(tp=args.tensor_parallel_size, pp=args.pipeline_parallel_size, ep=ep)
        # async scheduling (one stage): the next step is scheduled and sent while the workers run this one
        self.async_scheduling = args.async_scheduling and self.layout.pp == 1
        self.expert_placement = (plan_placement(cfg, ep, args.expert_placement, args.expert_load,
                                                args.num_redundant_experts) if ep > 1 else None)
        h, vocab = cfg.hidden_size, cfg.vocab_size
        embed = vocab * h * (1 if cfg.tie_word_embeddings else 2)
        layer_params = (cfg.num_params() - embed - h) / cfg.num_hidden_layers  # mean over dense and MoE layers
        self.stage_layers = split_layers(cfg.num_hidden_layers, self.layout.pp, layer_params, vocab * h,
                                         vocab * h + h, args.pp_layer_split)
        self.kv_cache_dtype = "auto" if args.kv_cache_dtype == "auto" else "fp8"
        """the KV cache's elements: the model dtype, or FP8 (kv_cache_dtype fp8 and fp8_e4m3 are one format)"""
        self.device = resolve_device(args.device)
        self.dtype = self._pick_dtype(args.dtype)
        if args.attention_backend == "triton" and self.device != "cuda":
            raise ConfigError("attention_backend triton runs on CUDA devices only: use torch (or auto) on the CPU")
        if args.external_workers:
            pass  # torchrun places the ranks, possibly on other nodes: nothing to count here
        elif self.device == "cuda":
            self.layout.check_world(visible_gpus() - args.first_device, "GPUs (one per rank)")
        else:
            self.layout.check_world(_max_cpu_workers(), "CPU worker processes")
            kv = args.kv_cache_memory_bytes if args.kv_cache_memory_bytes is not None else CPU_KV_CACHE_BYTES
            check_host_memory(source.name, cfg.num_params(), self.dtype, kv * self.layout.world_size,
                              available_host_bytes())
        shard_heads(cfg.num_attention_heads, cfg.num_key_value_heads, self.layout.tp, 0)  # raises if tp > heads
        if cfg.vocab_size < self.layout.tp:
            raise LayoutError(f"vocab_size={cfg.vocab_size} is smaller than tensor_parallel_size={self.layout.tp}")
        model_len = cfg.max_position_embeddings
        if args.max_model_len is not None:
            if args.max_model_len > model_len:
                raise ConfigError(f"max_model_len={args.max_model_len} must be in [1, {model_len}] "
                                  f"(the model's max_position_embeddings)")
            model_len = args.max_model_len
        self.tokenizer = load_tokenizer(source, args.tokenizer, args.chat_template, args.download_dir)
        self.grammars = Grammars(self.tokenizer, cfg.vocab_size)
        # worker groups: the first one, then a fresh one each time a group fails (recovery.py)
        self.recovery = Recovery(args.max_worker_restarts)
        self.executor: Executor | None = None
        kv = self._start_workers(model_len, args.max_model_len is not None)
        self.max_model_len = kv.max_model_len
        self.kv_capacity_tokens = kv.capacity_tokens
        self.block_manager = BlockManager(kv.blocks, args.block_size, enable_prefix_caching=args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs,
                                   token_budget(args.max_num_batched_tokens, self.max_model_len))
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self.requests: dict[str, list[Sequence]] = {}
        self.request_info: dict[str, tuple[str | None, RequestMetrics]] = {}
        self._errors: dict[str, str] = {}  # request id -> why it failed on its own
        self._seq_ids = itertools.count()
        self._finished_seq_ids: list[int] = []
        self.num_generated_tokens = 0  # over the engine's life (metrics)
        self.last_step_exec_s = 0.0  # the output rank's time inside the last finished step
        self.in_flight: deque[list[ScheduledSeq]] = deque()  # batches submitted, oldest first
        self._masks_due: tuple[list[ScheduledSeq], list[tuple[SeqPlan, Sequence]]] | None = None
        """the batch in flight whose grammar masks follow its plan, and its constrained rows (_plan)"""
        self.max_batches_in_flight = 2 if self.async_scheduling else args.max_batches_in_flight or self.layout.pp
        self._in_flight_ids: Counter[int] = Counter()  # seq id -> its batches in flight
        self._drained: list[RequestOutput] = []
        # debugging/tests: keep every sampled row's full logits, keyed by (request id, completion index)
        self.return_logits = False
        self.logits_log: dict[tuple[str, int], list[Any]] = {}
        # the process's objects so far (torch, transformers, the tokenizer) stay for its life: move them out
        # of the cyclic collector's full passes, which scan every tracked object and stall a step
        gc.collect()
        gc.freeze()

    # ---- set-up helpers ----------------------------------------------------------------------
    def _start_workers(self, model_len: int, model_len_given: bool) -> KVCacheSize:
        """Start a worker group (load, size and allocate the KV cache, capture graphs); its cache size."""
        args = self.args
        self.executor = Executor(self.layout, self.source, self._worker_options(model_len),
                                 external_workers=args.external_workers, driver_host=args.driver_host,
                                 driver_port=args.driver_port, first_device=args.first_device,
                                 step_timeout_s=args.step_timeout_s, generation=self.recovery.generation)
        try:
            kv = size_kv_cache(self.executor.ready, args.block_size, args.kv_cache_memory_bytes,
                               self.device == "cuda", model_len, model_len_given)
            graphs = self.executor.call(AllocateKV(kv.blocks))[0]
        except BaseException:
            self.executor.kill()
            raise
        self.attention_backend = self.executor.ready[0].attention_backend  # what auto became
        self.rank_checks = check_workers(self.executor.ready)  # names a rank slower than its peers
        self.all_reduce_path = self.executor.ready[0].all_reduce_path
        if self.layout.tp > 1:  # NCCL alone on GPUs that could do better is worth a warning
            level = logging.WARNING if "no peer-to-peer" in self.all_reduce_path else logging.INFO
            log.log(level, "shardlm: tensor-parallel all-reduce: %s", self.all_reduce_path)
        # decode steps replay CUDA graphs (rank 0's count; none on CPU, with enforce_eager, or for MoE models)
        self.cuda_graphs = graphs.get("graphs", 0) > 0
        self.graph_capture = {k: graphs[k] for k in ("graphs", "capture_s", "graph_pool_bytes") if k in graphs}
        if self.cuda_graphs:  # what the KV budget set aside for the pool (measured eagerly before capture)
            self.graph_capture["reserved_bytes"] = self.executor.ready[0].graph_reserve_bytes
        return kv

    def _replace_workers(self, cause: WorkerError) -> None:
        """The worker group failed (a rank died or hung): start a fresh one and put every live sequence
        back in the queue with its prompt and the tokens it has, to resume by recomputation. Raises the
        last failure once max_worker_restarts groups in a row failed before completing a step."""
        self.executor.kill()
        live = [s for seqs in self.requests.values() for s in seqs if not s.finished]
        for seq in live:
            seq.reset_for_recompute()
        self.in_flight.clear()
        self._in_flight_ids.clear()
        self._masks_due = None
        self._finished_seq_ids = []  # the new workers keep no per-sequence state
        while True:
            self.recovery.begin(cause)  # raises once the budget is spent
            try:
                kv = self._start_workers(self.max_model_len, True)
            except WorkerError as exc:  # the new group failed too: try again within the budget
                cause = exc
                continue
            finally:
                self.recovery.end()
            break
        self.kv_capacity_tokens = kv.capacity_tokens
        self.block_manager = BlockManager(kv.blocks, self.args.block_size,
                                          enable_prefix_caching=self.args.enable_prefix_caching)
        self.scheduler = self.scheduler.rebuilt(self.block_manager, sorted(live, key=lambda s: s.seq_id))

    def _pick_dtype(self, dtype: str) -> str:
        if dtype == "auto":
            return "bfloat16" if self.device == "cuda" else "float32"
        return dtype

    def _worker_options(self, model_len: int) -> WorkerOptions:
        args = self.args
        budget = worker_budget(args.kv_cache_memory_bytes, args.max_num_batched_tokens, model_len)
        return WorkerOptions(
            dtype=self.dtype, device=self.device, max_model_len=model_len, block_size=args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_bytes=budget.cpu_kv_cache_bytes,
            profile_tokens=budget.profile_tokens, cpu_threads=max(1, (os.cpu_count() or 1) // self.layout.world_size),
            stage_layers=self.stage_layers, max_num_seqs=args.max_num_seqs,
            max_seq_len_to_capture=args.max_seq_len_to_capture,
            cuda_graphs=self.device == "cuda" and not args.enforce_eager, trace=bool(args.trace),
            attention_backend=args.attention_backend, async_scheduling=self.async_scheduling,
            expert_placement=self.expert_placement, custom_all_reduce=not args.disable_custom_all_reduce,
            kv_cache_dtype=self.kv_cache_dtype)

    # ---- requests ----------------------------------------------------------------------------
    def validate_prompt(self, prompt_ids: list[int]) -> None:
        """Raise ValueError naming the problem if these prompt tokens cannot be served."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.source.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but max_model_len is {self.max_model_len}: "
                f"shorten the prompt (it must leave room for at least one new token) or raise max_model_len"
            )

    def validate_sampling(self, params: SamplingParams, grammar: bool = True) -> None:
        """Raise SamplingError naming the field if `params` names tokens outside this model's vocabulary, or
        (grammar) asks for a structured output that does not compile."""
        vocab = self.source.config.vocab_size
        bad = [t for t in params.logit_bias or {} if t >= vocab]
        if bad:
            raise SamplingError("logit_bias", f"logit_bias names token ids {bad[:5]} outside the vocabulary "
                                              f"[0, {vocab})")
        if grammar and params.structured_outputs is not None:
            self.grammars.check(params.structured_outputs)  # compiles, or says why not

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_ids)
        self.validate_sampling(params, grammar=False)  # (the matchers below compile it)
        seqs = [Sequence(next(self._seq_ids), request_id, i, list(prompt_ids), params,
                         logprobs=[] if params.logprobs is not None else None,
                         prompt_logprobs=[None] * len(prompt_ids) if params.prompt_logprobs is not None and i == 0
                         else None) for i in range(params.completions)]
        if params.structured_outputs is not None:
            for s, m in zip(seqs, self.grammars.matchers(params.structured_outputs, len(seqs))):
                s.matcher = m
        self.requests[request_id] = seqs
        self.request_info[request_id] = (prompt, RequestMetrics(arrival_time=time.monotonic()))
        for s in seqs:
            self.scheduler.add(s)

    def take_requests(self) -> list[tuple[str, str | None, RequestMetrics, list[Sequence]]]:
        """Give up every unfinished request, with its completions so far, for another engine to finish
        (adopt_request): what a data-parallel replica that failed for good hands to the others."""
        taken = [(rid, *self.request_info[rid], seqs) for rid, seqs in self.requests.items()]
        self.requests, self.request_info = {}, {}
        return taken

    def adopt_request(self, request_id: str, prompt: str | None, metrics: RequestMetrics,
                      seqs: list[Sequence]) -> None:
        """Finish another engine's request from where it was: its unfinished completions are queued to
        recompute their prompt and the tokens they have, then go on."""
        self.requests[request_id] = seqs
        self.request_info[request_id] = (prompt, metrics)
        for seq in seqs:
            seq.seq_id = next(self._seq_ids)
            if not seq.finished:
                seq.reset_for_recompute()
                self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        for s in self.requests.pop(request_id, []):
            self.scheduler.abort(s)
            self._finished_seq_ids.append(s.seq_id)
        self.request_info.pop(request_id, None)
        self._errors.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self.in_flight) or bool(self._drained)

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance generation by one batch; return the outputs of requests that gained tokens.

        Up to pipeline_parallel_size batches of disjoint sequences are kept in flight, so that while
        the last stage works on one batch the first stage already runs the next; this call
        submits batches until the pipeline is full, then finishes the oldest. With one stage it is
        simply: schedule a batch, run it, collect its tokens.
        """
        if self._drained:  # outputs finished by drain() are handed out first
            outputs, self._drained = self._drained, []
            return outputs
        try:
            while len(self.in_flight) < self.max_batches_in_flight:
                batch = self.scheduler.schedule(set(self._in_flight_ids), self._micro_batch_seqs(),
                                                self._micro_batch_tokens(), self._ahead())
                if not batch:
                    break
                self.executor.submit(self._plan(batch, self._finished_seq_ids))
                self._finished_seq_ids = []
                self.in_flight.append(batch)
                self._in_flight_ids.update(item.seq.seq_id for item in batch)  # a prompt may have 2 chunks in flight
            if not self.in_flight:
                if self.scheduler.has_work():
                    raise RuntimeError("scheduler made no progress: the KV cache cannot hold the next request")
                return []
            return self._finish_oldest()
        except WorkerError as exc:  # a rank died or hung: a fresh group takes over, nothing is lost
            self._replace_workers(exc)
            return []
        except BaseException:
            self.executor.shutdown(grace_s=1.0)  # no trace: the workers may be gone
            raise

    def _ahead(self) -> set[int]:
        """Async scheduling: the sequences of the batch in flight that may decode their next token before it
        comes back: those it samples, unless that token surely ends them (max_tokens, max_model_len). One
        that a stop token or string ends after all wastes one row of the next step; its token is dropped."""
        if not self.async_scheduling or not self.in_flight:
            return set()
        return {item.seq.seq_id for item in self.in_flight[-1]  # (a grammar's mask follows the plan: _plan)
                if item.sample and not item.seq.finished and not self.outputs.ends_by_length(item.seq, coming=1)}

    def _plan(self, batch: list[ScheduledSeq], finished: list[int]) -> StepPlan:
        """The step plan of a scheduled batch. A constrained sequence whose last token is still in flight
        (async scheduling: PREV_TOKEN) gets its grammar's mask once that token is back: the plan says the
        masks follow and _finish_oldest sends them, while the workers run this step's forward."""
        seqs, constrained, follow = [], [], False
        for item in batch:
            seq = item.seq
            blocks, start = self._new_blocks(seq)
            row = SeqPlan(seq.seq_id, item.tokens, item.start, blocks, item.sample, seq.sampling, blocks_from=start)
            metrics = self.request_info[seq.request_id][1]
            if metrics.first_scheduled_time is None:  # its queue time ends (the prefix cache may skip chunks)
                metrics.first_scheduled_time = time.monotonic()
            if seq.prompt_logprobs is not None:  # positions start .. last - 1 give prompt tokens start + 1 .. last
                last = min(item.start + len(item.tokens), len(seq.prompt_ids) - 1)
                if last > item.start:
                    row.prompt_logprobs = (seq.params.prompt_logprobs, seq.prompt_ids[item.start + 1: last + 1])
            if item.sample:
                # the token this step samples is the completion's k-th (one more may be in flight: PREV_TOKEN)
                k = len(seq.output_ids) + (item.tokens[-1] == PREV_TOKEN)
                if k < seq.params.min_tokens:
                    row.ban = self._stop_ids(seq)
                if seq.sampling.penalized and not seq.penalty_seeded:  # the first pick after a (re)prefill
                    row.history = (len(seq.prompt_ids), seq.prompt_ids + seq.output_ids)
                    seq.penalty_seeded = True
                if seq.matcher is not None:
                    row.mask_row = len(constrained)
                    constrained.append((row, seq))
                    follow |= item.tokens[-1] == PREV_TOKEN
            seqs.append(row)
        plan = StepPlan(seqs, finished, self.return_logits, masks_follow=follow, release=self.scheduler.released)
        self.scheduler.released = []
        if follow:
            self._masks_due = (batch, constrained)
        elif constrained:
            plan.masks, unban = self._grammar_masks(constrained)
            for row, _ in constrained:
                if row.seq_id in unban:
                    row.ban = None
        return plan

    def _grammar_masks(self, constrained: list[tuple[SeqPlan, Sequence]]) -> tuple[Any, list[int]]:
        """The plan's mask rows for its constrained sequences (in mask_row order), and those of them whose
        min_tokens ban is lifted: their grammar allows nothing but what it bans, so they may end. A sequence
        that ended meanwhile (its row in flight is dropped) gets a row that allows everything."""
        masks = self.grammars.masks([None if seq.finished else seq.matcher for _, seq in constrained])
        unban = [row.seq_id for row, _ in constrained
                 if row.ban and not _allows_other_than(masks[row.mask_row], row.ban)]
        return masks, unban

    def _stop_ids(self, seq: Sequence) -> list[int]:
        """The tokens that would end `seq` (banned before min_tokens)."""
        vocab = self.source.config.vocab_size
        eos = [] if seq.params.ignore_eos else [t for t in self.tokenizer.eos_token_ids if t < vocab]
        return eos + [t for t in seq.params.stop_token_ids if t not in eos and t < vocab]

    @staticmethod
    def _new_blocks(seq: Sequence) -> tuple[list[int], int]:
        """(the entries of seq's block table the workers lack, the index they start at): a table grows at its
        end, so once sent only its new blocks travel (a long context's table was most of a step's message);
        a table that changed otherwise (preempted, then given other blocks) goes whole."""
        blocks = seq.blocks  # (the block manager appends to a table, or replaces it with a new list)
        start = seq.sent_len if seq.sent_table is blocks and seq.sent_len <= len(blocks) else 0
        seq.sent_table, seq.sent_len = blocks, len(blocks)
        return blocks[start:], start

    def drain(self) -> None:
        """Finish every batch in flight without submitting new ones (before profiling or stats);
        the outputs come out of the next step(). Nothing to wait for once the workers are shut down."""
        if self.executor.closed:
            return
        try:
            while self.in_flight:
                self._drained.extend(self._finish_oldest())
        except WorkerError as exc:
            self._replace_workers(exc)

    def _finish_oldest(self) -> list[RequestOutput]:
        result = self.executor.collect()
        self.recovery.step_completed()
        self.last_step_exec_s = result.exec_s
        batch = self.in_flight.popleft()
        for item in batch:
            self._in_flight_ids[item.seq.seq_id] -= 1
            if self._in_flight_ids[item.seq.seq_id] <= 0:
                del self._in_flight_ids[item.seq.seq_id]
            item.seq.num_computed = item.start + len(item.tokens)
        by_id = {item.seq.seq_id: item.seq for item in batch}
        for p in result.prompt_logprobs:
            self.outputs.add_prompt_logprobs(by_id[p.seq_id], p)
        now = time.monotonic()
        touched: dict[str, None] = {}
        for row, sampled in enumerate(result.tokens):
            seq = by_id[sampled.seq_id]
            # aborted while in flight, or (async scheduling) ended by the token of the step before
            if seq.finished or not any(s is seq for s in self.requests.get(seq.request_id, ())):
                continue
            if sampled.error is not None:  # this request's own fault: it ends, the others go on
                self._fail_request(seq.request_id, sampled.error)
                touched[seq.request_id] = None
                continue
            if self.return_logits:
                self.logits_log.setdefault((seq.request_id, seq.index), []).append(result.logits[row])
            self.num_generated_tokens += 1
            finish = self.outputs.append(seq, sampled)
            if finish is not None:
                self._finish(seq, *finish)
            touched[seq.request_id] = None
        for rid in touched:  # once per request per step: its completions' tokens arrive together
            metrics = self.request_info[rid][1]
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            else:
                metrics.token_gaps.append(now - metrics.last_token_time)
            metrics.last_token_time = now
        if self._masks_due is not None and self.in_flight and self.in_flight[0] is self._masks_due[0]:
            # the batch in flight waits for its masks: its constrained sequences' matchers now have the
            # tokens just collected
            masks, unban = self._grammar_masks(self._masks_due[1])
            self._masks_due = None
            self.executor.send_masks(StepMasks(masks, unban))
        return [self._output(rid) for rid in touched]

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        self._finished_seq_ids.append(seq.seq_id)

    def _fail_request(self, request_id: str, error: str) -> None:
        """End every completion of one request with finish_reason "error" (the request's own fault)."""
        self._errors[request_id] = error
        for seq in self.requests[request_id]:
            if not seq.finished:
                self._finish(seq, "error", None)

    def _output(self, request_id: str) -> RequestOutput:
        prompt, metrics = self.request_info[request_id]
        out = self.outputs.request_output(request_id, prompt, self.requests[request_id], metrics,
                                          self._errors.get(request_id))
        if out.finished:
            if metrics.finished_time is None:
                metrics.finished_time = time.monotonic()
            del self.requests[request_id]
            del self.request_info[request_id]
            self._errors.pop(request_id, None)
        return out

    def _micro_batch_tokens(self) -> int | None:
        """With pipeline stages, a micro-batch gets its share of the token budget, so a long prompt
        is cut into chunks that follow each other through the stages."""
        if self.max_batches_in_flight == 1 or self.async_scheduling:
            return None
        return max(1, self.scheduler.max_num_batched_tokens // self.max_batches_in_flight)

    def _micro_batch_seqs(self) -> int | None:
        """With pipeline stages, cut the live sequences into as many micro-batches as may be in flight."""
        if self.max_batches_in_flight == 1 or self.async_scheduling:
            return None
        live = len(self.scheduler.running) + len(self.scheduler.waiting)
        return max(1, -(-live // self.max_batches_in_flight))

    # ---- what the engine reports -------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """How this engine runs, in the names `plan --validate` reads from a bench result (bench latency's
        JSON, and the server's /engine that bench serve records)."""
        return {"model": self.source.name, "tensor_parallel_size": self.layout.tp,
                "pipeline_parallel_size": self.layout.pp, "expert_parallel_size": self.layout.ep,
                "dtype": self.dtype, "device": self.device, "cuda_graphs": self.cuda_graphs,
                "attention_backend": self.attention_backend, "async_scheduling": self.async_scheduling,
                "quantization": self.source.config.quantization, "fp8_lm_head": self.source.config.fp8_lm_head,
                "kv_cache_dtype": self.kv_cache_dtype,
                "max_num_seqs": self.scheduler.max_num_seqs,
                "max_num_batched_tokens": self.scheduler.max_num_batched_tokens}

    def stats(self) -> EngineStats:
        """Counters of the scheduler, the KV blocks and the tokens generated (cheap: no worker round trip)."""
        return EngineStats(self.scheduler.stats(), self.block_manager.stats(), self.num_generated_tokens,
                           self.last_step_exec_s)

    def profile_step(self) -> dict[int, dict[str, Any]]:
        """Profile one decode step of the running batch on every rank, without advancing it.

        Only between decode steps (nothing waiting): re-running a decode step rewrites the same
        K/V slots with the same values, so the following real step is unaffected.
        """
        self.drain()
        if self.scheduler.waiting or not self.scheduler.running:
            raise RuntimeError("profile_step needs a running batch with nothing waiting")
        batch = self.scheduler.schedule()
        seeded = [item.seq.penalty_seeded for item in batch]
        plan = self._plan(batch, [])
        for item, was in zip(batch, seeded):  # the workers undo the step's sampler state (penalty counts too)
            item.seq.penalty_seeded = was
        for seq in plan.seqs:
            seq.sample = True
        return self._call(ProfileStep(plan))

    def _call(self, cmd: Command) -> dict[int, dict[str, Any]]:
        """A command to every rank; a failed group is replaced (and the error raised: no reply came)."""
        try:
            return self.executor.call(cmd)
        except WorkerError as exc:
            self._replace_workers(exc)
            raise

    def stage_stats(self, reset: bool = False) -> dict[int, dict[str, Any]]:
        """Per rank: seconds computing, the wall window of its steps and the idle fraction (the
        pipeline bubble, for pipeline stages), from the workers' own step accounting."""
        self.drain()
        return self._call(Stats(reset=reset))

    def expert_stats(self, reset: bool = False) -> dict[str, Any]:
        """Routing since the start (or the last reset): see stats.expert_report. With tensor-parallel
        experts every rank runs every routed token, so the imbalance is 1.0 by construction."""
        if not self.source.config.is_moe:
            raise ConfigError(f"{self.source.name} is a dense model: it has no experts to report on")
        self.drain()
        report = expert_report(self._call(Stats(reset_experts=reset)))
        return {"model": self.source.name, "num_experts": self.source.config.num_experts,
                "expert_parallel_size": self.layout.ep, **report, "placement": self.expert_placement}

    def write_trace(self, path: str) -> None:
        """Chrome/Perfetto trace of every rank's steps: one process track per rank."""
        write_trace(path, self._call(Stats(events=True)),
                    {"model": self.source.name, "layout": str(self.layout)}, self.rank_checks)

    def shutdown(self, grace_s: float = 5.0) -> None:
        executor = getattr(self, "executor", None)
        if executor is None:
            return
        if self.args.trace and not executor.closed:
            try:
                self.drain()
                self.write_trace(self.args.trace)
                log.info("shardlm: trace written to %s (open it in https://ui.perfetto.dev)", self.args.trace)
            except Exception as exc:  # noqa: BLE001 - a failed trace must not stop the shutdown
                warnings.warn(f"could not write the trace to {self.args.trace}: {exc}", stacklevel=2)
        executor.shutdown(grace_s=grace_s)
