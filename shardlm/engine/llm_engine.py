"""The engine (driver process): tokenizer, scheduler and KV blocks; workers do the forward passes."""

from __future__ import annotations

import gc
import itertools
import os
import time
import warnings
from collections import Counter, deque
from typing import Any

from ..common.config import ConfigError, check_output_path
from ..common.layout import LayoutError, ParallelLayout, shard_heads, split_layers
from ..common.model_source import ModelSource, resolve_model
from .arg_utils import EngineArgs
from .block_manager import BlockManager
from .executor import Executor, WorkerOptions
from .moe_placement import plan_placement
from .sampling_params import SamplingParams
from .scheduler import ScheduledSeq, Scheduler
from .sequence import CompletionOutput, Logprob, RequestMetrics, RequestOutput, Sequence
from .tokenizer import decode_next, load_tokenizer


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA install simply means no GPU
        return 0


def _max_cpu_workers() -> int:
    return max(8, 2 * (os.cpu_count() or 1))


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        spec = resolve_model(args.model, seed=args.seed)
        spec.config.validate()
        self.spec: ModelSource = spec
        cfg = spec.config
        if args.enable_expert_parallel and not cfg.is_moe:
            raise ConfigError(f"enable_expert_parallel needs a mixture-of-experts model; {spec.name} "
                              f"({cfg.model_type}) is dense: drop enable_expert_parallel")
        ep = args.tensor_parallel_size if args.enable_expert_parallel else 1
        self.layout = ParallelLayout(tp=args.tensor_parallel_size, pp=args.pipeline_parallel_size, ep=ep)
        self.expert_placement = (plan_placement(cfg, ep, args.expert_placement, args.expert_load,
                                                args.num_redundant_experts) if ep > 1 else None)
        if ep == 1 and (args.expert_load or args.num_redundant_experts or args.expert_placement != "round_robin"):
            raise ConfigError("expert_placement, expert_load and num_redundant_experts place experts on expert "
                              "parallel ranks: add enable_expert_parallel with tensor_parallel_size > 1")
        h, vocab = cfg.hidden_size, cfg.vocab_size
        embed = vocab * h * (1 if cfg.tie_word_embeddings else 2)
        layer_params = (cfg.num_params() - embed - h) / cfg.num_hidden_layers  # mean over dense and MoE layers
        self.stage_layers = split_layers(cfg.num_hidden_layers, self.layout.pp, layer_params, vocab * h,
                                         vocab * h + h, args.pp_layer_split)
        self.device = self._pick_device(args.device)
        self.dtype = self._pick_dtype(args.dtype)
        if args.external_workers:
            pass  # torchrun places the ranks, possibly on other nodes: nothing to count here
        elif self.device == "cuda":
            self.layout.check_world(_visible_gpus() - args.first_device, "GPUs (one per rank)")
        else:
            self.layout.check_world(_max_cpu_workers(), "CPU worker processes")
        shard_heads(cfg.num_attention_heads, cfg.num_key_value_heads, self.layout.tp, 0)  # raises if tp > heads
        if cfg.vocab_size < self.layout.tp:
            raise LayoutError(f"vocab_size={cfg.vocab_size} is smaller than tensor_parallel_size={self.layout.tp}")
        model_len = cfg.max_position_embeddings
        if args.max_model_len is not None:
            if args.max_model_len < 1 or args.max_model_len > model_len:
                raise ConfigError(f"max_model_len={args.max_model_len} must be in [1, {model_len}] "
                                  f"(the model's max_position_embeddings)")
            model_len = args.max_model_len
        for name in ("max_num_seqs", "block_size", "max_num_batched_tokens", "max_batches_in_flight",
                     "max_seq_len_to_capture"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(args, name)}")
        if not 0 < args.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}")
        check_output_path("trace", args.trace)  # written at shutdown: found out now, not after the run
        self.tokenizer = load_tokenizer(spec)
        kv_bytes = args.kv_cache_memory_bytes if args.kv_cache_memory_bytes is not None else 1 << 30
        profile_tokens = min(args.max_num_batched_tokens or max(model_len, 2048), 8192)
        opts = WorkerOptions(
            dtype=self.dtype, device=self.device, max_model_len=model_len, block_size=args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_bytes=kv_bytes,
            profile_tokens=profile_tokens,
            cpu_threads=max(1, (os.cpu_count() or 1) // self.layout.world_size),
            stage_layers=self.stage_layers, trace=bool(args.trace), expert_placement=self.expert_placement,
            cuda_graphs=self.device == "cuda" and not args.enforce_eager, max_num_seqs=args.max_num_seqs,
            max_seq_len_to_capture=args.max_seq_len_to_capture,
        )
        self.executor = Executor(self.layout, spec.to_dict(), opts, external_workers=args.external_workers,
                                 driver_host=args.driver_host, driver_port=args.driver_port,
                                 first_device=args.first_device)
        try:
            blocks = self.executor.kv_blocks_available
            if args.kv_cache_memory_bytes is not None and self.device == "cuda":
                block_bytes = max(r["block_bytes"] for r in self.executor.ready.values())
                blocks = min(blocks, args.kv_cache_memory_bytes // block_bytes)
            capacity = blocks * args.block_size
            if capacity < min(model_len, 16 * args.block_size) or blocks < 1:
                raise ConfigError(
                    f"the KV cache holds only {capacity} tokens per rank after the weights; raise "
                    f"gpu_memory_utilization / kv_cache_memory_bytes, use more GPUs, or lower max_model_len"
                )
            if args.max_model_len is None:
                model_len = min(model_len, capacity)
            elif model_len > capacity:
                raise ConfigError(f"max_model_len={model_len} does not fit the KV cache ({capacity} tokens per rank); "
                                  f"lower max_model_len or give the cache more memory")
            graphs = self.executor.allocate_kv(blocks)
        except BaseException:
            self.executor.shutdown(grace_s=1.0)
            raise
        self.max_model_len = model_len
        self.kv_capacity_tokens = capacity
        # decode steps replay CUDA graphs (rank 0's count; none on CPU, with enforce_eager, or for MoE models)
        self.cuda_graphs = graphs.get("graphs", 0) > 0
        self.graph_capture = {k: graphs[k] for k in ("graphs", "capture_s", "graph_pool_bytes") if k in graphs}
        if self.cuda_graphs:  # what the KV budget set aside for the pool (measured eagerly before capture)
            self.graph_capture["reserved_bytes"] = self.executor.ready[0].get("graph_reserve_bytes", 0)
        self.block_manager = BlockManager(blocks, args.block_size, enable_prefix_caching=args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs,
                                   args.max_num_batched_tokens or max(model_len, 2048))
        self.requests: dict[str, list[Sequence]] = {}
        self.request_info: dict[str, tuple[str | None, RequestMetrics]] = {}
        self._seq_ids = itertools.count()
        self._finished_seq_ids: list[int] = []
        self.num_generated_tokens = 0  # over the engine's life (metrics)
        self.in_flight: deque[list[ScheduledSeq]] = deque()  # batches submitted, oldest first
        self.max_batches_in_flight = args.max_batches_in_flight or self.layout.pp
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
    @staticmethod
    def _pick_device(device: str) -> str:
        if device == "auto":
            return "cuda" if _visible_gpus() > 0 else "cpu"
        if device not in ("cuda", "cpu"):
            raise ConfigError(f"device must be 'cuda', 'cpu' or 'auto', got {device!r}")
        if device == "cuda" and _visible_gpus() == 0:
            raise ConfigError("device='cuda' but no GPU is visible; use device='cpu'")
        return device

    def _pick_dtype(self, dtype: str) -> str:
        if dtype == "auto":
            return "bfloat16" if self.device == "cuda" else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        return dtype

    # ---- requests ----------------------------------------------------------------------------
    def validate_prompt(self, prompt_ids: list[int]) -> None:
        """Raise ValueError naming the problem if these prompt tokens cannot be served."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.spec.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but max_model_len is {self.max_model_len}: "
                f"shorten the prompt (it must leave room for at least one new token) or raise max_model_len"
            )

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_ids)
        seqs = [Sequence(next(self._seq_ids), request_id, i, list(prompt_ids), params,
                         logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        self.requests[request_id] = seqs
        self.request_info[request_id] = (prompt, RequestMetrics(arrival_time=time.monotonic()))
        for s in seqs:
            self.scheduler.add(s)

    def abort_request(self, request_id: str) -> None:
        for s in self.requests.pop(request_id, []):
            self.scheduler.abort(s)
            self._finished_seq_ids.append(s.seq_id)
        self.request_info.pop(request_id, None)

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
                                                self._micro_batch_tokens())
                if not batch:
                    break
                self.executor.submit({"seqs": [self._wire(item) for item in batch],
                                      "finished": self._finished_seq_ids, "return_logits": self.return_logits})
                self._finished_seq_ids = []
                self.in_flight.append(batch)
                self._in_flight_ids.update(item.seq.seq_id for item in batch)  # a prompt may have 2 chunks in flight
        except BaseException:
            self.executor.shutdown(grace_s=1.0)  # no trace: the workers may be gone
            raise
        if not self.in_flight:
            if self.scheduler.has_work():
                self.executor.shutdown(grace_s=1.0)
                raise RuntimeError("scheduler made no progress: the KV cache cannot hold the next request")
            return []
        return self._finish_oldest()

    def drain(self) -> None:
        """Finish every batch in flight without submitting new ones (before profiling or stats);
        the outputs come out of the next step()."""
        while self.in_flight:
            self._drained.extend(self._finish_oldest())

    def _finish_oldest(self) -> list[RequestOutput]:
        try:
            results, arrays = self.executor.collect()
        except BaseException:
            self.executor.shutdown(grace_s=1.0)
            raise
        batch = self.in_flight.popleft()
        for item in batch:
            self._in_flight_ids[item.seq.seq_id] -= 1
            if self._in_flight_ids[item.seq.seq_id] <= 0:
                del self._in_flight_ids[item.seq.seq_id]
            item.seq.num_computed = item.start + len(item.tokens)
        by_id = {item.seq.seq_id: item.seq for item in batch}
        now = time.monotonic()
        touched: dict[str, None] = {}
        for row, res in enumerate(results):
            seq = by_id[res["id"]]
            if not any(s is seq for s in self.requests.get(seq.request_id, ())):  # aborted while in flight
                continue
            if self.return_logits:
                self.logits_log.setdefault((seq.request_id, seq.index), []).append(arrays["logits"][row])
            self._append(seq, res)
            touched[seq.request_id] = None
            metrics = self.request_info[seq.request_id][1]
            if metrics.first_token_time is None:
                metrics.first_token_time = now
        return [self._output(rid) for rid in touched]

    def _micro_batch_tokens(self) -> int | None:
        """With pipeline stages, a micro-batch gets its share of the token budget, so a long prompt
        is cut into chunks that follow each other through the stages."""
        if self.max_batches_in_flight == 1:
            return None
        return max(1, self.scheduler.max_num_batched_tokens // self.max_batches_in_flight)

    def _micro_batch_seqs(self) -> int | None:
        """With pipeline stages, cut the live sequences into as many micro-batches as may be in flight."""
        if self.max_batches_in_flight == 1:
            return None
        live = len(self.scheduler.running) + len(self.scheduler.waiting)
        return max(1, -(-live // self.max_batches_in_flight))

    def profile_step(self) -> dict[int, dict[str, Any]]:
        """Profile one decode step of the running batch on every rank, without advancing it.

        Only between decode steps (nothing waiting): re-running a decode step rewrites the same
        K/V slots with the same values, so the following real step is unaffected.
        """
        self.drain()
        if self.scheduler.waiting or not self.scheduler.running:
            raise RuntimeError("profile_step needs a running batch with nothing waiting")
        batch = self.scheduler.schedule()
        plan = {"seqs": [dict(self._wire(item), sample=True) for item in batch], "finished": []}
        return {rank: {k: v for k, v in msg.items() if k not in ("event", "rank")}
                for rank, msg in self.executor.profile_step(plan).items()}

    def _wire(self, item: ScheduledSeq) -> dict[str, Any]:
        s = item.seq
        return {"id": s.seq_id, "tokens": item.tokens, "start": item.start, "blocks": s.blocks,
                "sample": item.sample, "params": s.params.to_wire(s.index)}

    def _append(self, seq: Sequence, res: dict[str, Any]) -> None:
        token, p = int(res["token"]), seq.params
        seq.output_ids.append(token)
        self.num_generated_tokens += 1
        seq.cumulative_logprob += res["logprob"]
        if seq.logprobs is not None:
            entry = {token: Logprob(res["logprob"], res["rank"], self.tokenizer.token_str(token))}
            for rank, (tid, lp) in enumerate(zip(*res.get("top", [[], []])), start=1):
                entry.setdefault(tid, Logprob(lp, rank, self.tokenizer.token_str(tid)))
            seq.logprobs.append(entry)
        # only the new token's text: decoding the whole output every step costs O(length) per token
        new = decode_next(self.tokenizer, seq.output_ids, seq.detok, p.skip_special_tokens)
        seq.text += new
        if not p.ignore_eos and token in self.tokenizer.eos_token_ids:
            self._finish(seq, "stop", None)
        elif token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif p.stop and new and (hit := self._find_stop(seq, len(new))):
            self._finish(seq, "stop", hit)
            return  # the text ends before the stop string; nothing after it is given out
        elif p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens:
            self._finish(seq, "length", None)
        elif len(seq) >= self.max_model_len:
            self._finish(seq, "length", None)
        if seq.finished:  # a character still cut between tokens is given out as it is
            seq.text += decode_next(self.tokenizer, seq.output_ids, seq.detok, p.skip_special_tokens, flush=True)

    @staticmethod
    def _find_stop(seq: Sequence, new_chars: int) -> str | None:
        """The first stop string (in the request's order) that the newest `new_chars` characters
        complete; the text is cut before it. Earlier text was searched when it arrived."""
        for stop in seq.params.stop:
            pos = seq.text.find(stop, max(0, len(seq.text) - new_chars - len(stop) + 1))
            if pos != -1:
                seq.text = seq.text[:pos]  # vLLM leaves the stop string out of the text
                return stop
        return None

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        self._finished_seq_ids.append(seq.seq_id)

    def _output(self, request_id: str) -> RequestOutput:
        seqs = self.requests[request_id]
        prompt, metrics = self.request_info[request_id]
        finished = all(s.finished for s in seqs)
        if finished and metrics.finished_time is None:
            metrics.finished_time = time.monotonic()
        outs = [CompletionOutput(s.index, s.text, list(s.output_ids), s.cumulative_logprob,
                                 list(s.logprobs) if s.logprobs is not None else None, s.finish_reason,
                                 s.stop_reason) for s in seqs]
        out = RequestOutput(request_id, prompt, seqs[0].prompt_ids, outs, finished, metrics)
        if finished:
            del self.requests[request_id]
            del self.request_info[request_id]
        return out

    def stage_stats(self, reset: bool = False) -> dict[int, dict[str, Any]]:
        """Per rank: seconds computing, the wall window of its steps and the idle fraction (the
        pipeline bubble, for pipeline stages), from the workers' own step accounting."""
        self.drain()
        return self.executor.stats(reset=reset)

    def expert_stats(self, reset: bool = False) -> dict[str, Any]:
        """Routing since the start (or the last reset): tokens per expert of every MoE layer, the
        rows each rank's experts processed in each step, and each step's imbalance: max / mean of
        those rows over the expert-parallel ranks of a stage (the worst stage). 1.0 is even; with
        tensor-parallel experts every rank runs every routed token, so it is 1.0 by construction."""
        if not self.spec.config.is_moe:
            raise ConfigError(f"{self.spec.name} is a dense model: it has no experts to report on")
        self.drain()
        stats = self.executor.stats(reset_experts=reset)
        tokens: dict[int, list[int]] = {}
        rows: dict[int, dict[int, list[int]]] = {}  # stage -> rank -> rows per step
        for rank, st in stats.items():
            if "moe" not in st:  # a pipeline stage whose layers are all dense
                continue
            for layer, counts in st["moe"]["tokens_per_expert"].items():
                acc = tokens.setdefault(int(layer), [0] * len(counts))
                tokens[int(layer)] = [a + c for a, c in zip(acc, counts)]
            rows.setdefault(st["pp"], {})[rank] = st["moe"]["step_rows"]
        steps = min((len(r) for stage in rows.values() for r in stage.values()), default=0)
        imbalance = []
        for i in range(steps):
            worst = 1.0
            for stage in rows.values():
                per_rank = [r[len(r) - steps + i] for r in stage.values()]
                if sum(per_rank):
                    worst = max(worst, max(per_rank) * len(per_rank) / sum(per_rank))
            imbalance.append(worst)
        return {"model": self.spec.name, "num_experts": self.spec.config.num_experts,
                "expert_parallel_size": self.layout.ep, "tokens_per_expert": dict(sorted(tokens.items())),
                "rows_per_rank_per_step": {r: v for stage in rows.values() for r, v in stage.items()},
                "step_imbalance": imbalance,
                "mean_imbalance": sum(imbalance) / len(imbalance) if imbalance else 1.0,
                "placement": self.expert_placement}

    def write_trace(self, path: str) -> None:
        """Chrome/Perfetto trace of every rank's steps: one process track per rank."""
        import json

        stats = self.executor.stats(events=True)
        events = []
        for rank, st in sorted(stats.items()):
            events.append({"name": "process_name", "ph": "M", "pid": rank,
                           "args": {"name": f"rank {rank} (pp stage {st['pp']}, tp {st['tp']})"}})
            events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
            for name, cat, start, end in st.get("events", []):
                events.append({"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": cat,
                               "ts": start * 1e6, "dur": max(0.0, end - start) * 1e6})
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms",
                       "otherData": {"model": self.spec.name, "layout": str(self.layout),
                                     "idle_fraction": {r: st["idle_fraction"] for r, st in stats.items()}}}, f)

    def shutdown(self, grace_s: float = 5.0) -> None:
        executor = getattr(self, "executor", None)
        if executor is None:
            return
        if self.args.trace and not executor.closed:
            try:
                self.drain()
                self.write_trace(self.args.trace)
            except Exception as exc:  # noqa: BLE001 - a failed trace must not stop the shutdown
                warnings.warn(f"could not write the trace to {self.args.trace}: {exc}", stacklevel=2)
        executor.shutdown(grace_s=grace_s)
