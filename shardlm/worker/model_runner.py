"""Model runner: owns this rank's model shard and KV cache, turns a step plan into a forward pass."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import torch

from ..common.model_source import ModelSource
from .distributed import ParallelContext
from .graphs import DecodeGraphs
from .layers.attention import build_metadata
from .models.llama import LlamaForCausalLM
from .sampler import Sampler
from .weights import open_reader


class ModelRunner:
    def __init__(self, spec: ModelSource, ctx: ParallelContext, dtype: torch.dtype, max_model_len: int,
                 block_size: int, expert_placement: list | None = None, cuda_graphs: bool = False,
                 max_num_seqs: int = 256, max_seq_len_to_capture: int = 8192):
        self.spec, self.ctx, self.dtype = spec, ctx, dtype
        self.block_size, self.max_model_len = block_size, max_model_len
        self.model = LlamaForCausalLM(spec.config, ctx, dtype, max_positions=max_model_len,
                                      expert_placement=expert_placement)
        self.moe = self.model.moe_layers()
        self.step_rows: deque[torch.Tensor] = deque(maxlen=4096)  # rows this rank's experts ran, per step
        self.sampler = Sampler(ctx.device)
        self.num_blocks = 0
        self.scratch_block = 0  # a KV block past the block manager's: padding rows of a graph step write there
        # decode steps as CUDA graphs (dense models on GPU; see graphs.py); captured once the KV cache exists
        self.graphs = None
        # (on the CPU only the padding is run, eagerly: a testing aid)
        if cuda_graphs and not self.moe:
            self.graphs = DecodeGraphs(self, max_num_seqs, max_seq_len_to_capture, capture=ctx.device.type == "cuda")
        # step accounting (always) and trace events (when tracing): wall-clock seconds
        self.busy_s = 0.0
        self.steps = self.graph_steps = 0  # steps run, and of them replayed as graphs (or padded like one)
        self.window: list[float] = []  # [first step start, last step end]
        self.tracing = False
        self.events: list[tuple[str, str, float, float]] = []  # (name, category, start, end)
        # last step: (seconds the host took to queue the layers, seconds from then to the end:
        # logits, sampling and waiting for the GPU)
        self.last_split = (0.0, 0.0)

    def record(self, name: str, category: str, start: float, end: float) -> None:
        if category == "compute":
            self.busy_s += end - start
        if self.tracing and len(self.events) < 200_000:
            self.events.append((name, category, start, end))

    def load(self, show_progress: bool) -> float:
        """Read this rank's weights; returns seconds taken."""
        t0 = time.perf_counter()
        reader = open_reader(self.spec.kind, self.spec.path, self.spec.config, self.spec.seed)
        from tqdm import tqdm

        with tqdm(total=self.spec.config.num_hidden_layers, desc=f"loading {self.spec.name}", unit="layer",
                  disable=not show_progress, delay=2.0) as bar:
            self.model.load_weights(reader, progress=bar.update)
        self._sync()
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    # ---- KV cache -------------------------------------------------------------------------
    def block_bytes(self) -> int:
        """Bytes one KV block takes on this rank (K and V, every layer)."""
        layers = self.model.attention_layers()
        per_token = sum(2 * a.n_kv * a.head_dim for a in layers) * self.dtype.itemsize
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
        greedy = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "logprobs": None}
        first = [sum(per_seq[:i]) for i in range(len(lens))]
        seqs = [{"id": -1 - i, "tokens": [0] * n, "start": 0, "blocks": list(range(b0, b0 + nb)), "sample": True,
                 "params": greedy} for i, (n, b0, nb) in enumerate(zip(lens, first, per_seq))]
        self.execute({"seqs": seqs})
        self._sync()
        activation = torch.cuda.max_memory_allocated(dev) - before - kv_bytes
        # the decode graphs keep a memory pool of their own: capture them once over this temporary cache to
        # measure it (the cache's size is not known before; the real graphs are captured over the real one)
        graph_bytes = self.graphs.capture_all()["graph_pool_bytes"] if self.graphs is not None else 0
        self.free_kv()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        used_by_others = total - free  # weights, CUDA context, NCCL buffers, other processes
        budget = int(total * gpu_memory_utilization) - used_by_others - activation - graph_bytes
        out = {"activation_bytes": activation, "graph_reserve_bytes": graph_bytes, "total": total,
               "used": used_by_others}
        blocks = max(0, budget // self.block_bytes() - (self.graphs is not None))  # less the scratch block
        return {"blocks": blocks, **out}

    def allocate_kv(self, num_blocks: int) -> None:
        """num_blocks for the block manager, plus the scratch block when decode runs as graphs."""
        layers = self.model.attention_layers()
        self.scratch_block = num_blocks
        slots = (num_blocks + (self.graphs is not None)) * self.block_size
        for a in layers:
            a.k_cache = torch.empty(slots, a.n_kv, a.head_dim, device=self.ctx.device, dtype=self.dtype)
            a.v_cache = torch.empty(slots, a.n_kv, a.head_dim, device=self.ctx.device, dtype=self.dtype)
        self.num_blocks = num_blocks

    def capture_graphs(self) -> dict[str, float]:
        """Capture the decode graphs over the KV cache just allocated (nothing to do without graphs)."""
        return self.graphs.capture_all() if self.graphs is not None else {"graphs": 0, "capture_s": 0.0}

    def free_kv(self) -> None:
        if self.graphs is not None:
            self.graphs.reset()
        for a in self.model.attention_layers():
            a.k_cache = a.v_cache = None
        self.num_blocks = 0

    # ---- one step ---------------------------------------------------------------------------
    def execute_profiled(self, plan: dict[str, Any]) -> dict[str, float]:
        """Run one step under torch.profiler; return GPU time per kind of kernel (us), the largest kernels and
        CPU ops, and the step's wall time. The step runs once before without the profiler, for the host's
        split between queueing the layers and waiting after them."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.ctx.device.type == "cuda" else [])
        # the step runs again here: keep it out of the routing statistics
        counts = {i: m.tokens_per_expert.clone() for i, m in self.moe.items()}
        steps = len(self.step_rows)
        # first unprofiled: how long the host takes to issue the step vs. how long it then waits
        t0 = time.perf_counter()
        self.execute(plan)
        self._sync()
        plain_wall = time.perf_counter() - t0
        issue, wait = self.last_split
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            self.execute(plan)
            self._sync()
            wall = time.perf_counter() - t0
        for i, m in self.moe.items():
            m.tokens_per_expert.copy_(counts[i])
        while len(self.step_rows) > steps:
            self.step_rows.pop()
        # send/recv kernels are the MoE all-to-all (and the pipeline hand-off); the rest of NCCL is
        # the TP all-reduce / all-gather
        kinds = {"communication": 0.0, "send_recv": 0.0, "gemm": 0.0, "attention": 0.0, "other": 0.0}
        kernels, cpu_ops = [], []
        for evt in prof.key_averages():
            if evt.device_type.name == "CPU" and evt.self_cpu_time_total > 0:
                cpu_ops.append((evt.self_cpu_time_total, evt.key, evt.count))
            us = getattr(evt, "self_device_time_total", 0.0) or 0.0
            if us <= 0 or evt.device_type.name != "CUDA":
                continue
            kernels.append((us, evt.key, evt.count))
            name = evt.key.lower()
            if "nccl" in name and "sendrecv" in name:
                kinds["send_recv"] += us
            elif "nccl" in name:
                kinds["communication"] += us
            elif any(k in name for k in ("attention", "fmha", "flash", "softmax")):  # before gemm: fmha_cutlass...
                kinds["attention"] += us
            elif any(k in name for k in ("gemm", "nvjet", "cutlass", "matmul", "sm90")):
                kinds["gemm"] += us
            else:
                kinds["other"] += us
        kinds = {f"{k}_us": v for k, v in kinds.items()}
        kinds["gpu_busy_us"] = sum(kinds.values())
        kinds["wall_us"] = wall * 1e6
        kinds["unprofiled_wall_us"] = plain_wall * 1e6
        kinds["host_issue_us"], kinds["host_wait_us"] = issue * 1e6, wait * 1e6
        kinds["kernel_launches"] = sum(n for _, _, n in kernels)
        # the largest items, to say where a step's time goes: [name, us, calls]
        kinds["top_kernels"] = [[k[:120], round(us, 1), n] for us, k, n in sorted(kernels, reverse=True)[:12]]
        kinds["top_cpu_ops"] = [[k[:120], round(us, 1), n] for us, k, n in sorted(cpu_ops, reverse=True)[:12]]
        return kinds

    def _graph_shape(self, plan: dict[str, Any]) -> tuple[int, int] | None:
        """The captured (batch, context) pair this step replays, or None to run it eagerly: graphs run
        decode steps (one new token per sequence, every sequence sampled) that fit a pair."""
        seqs = plan["seqs"]
        if self.graphs is None or any(len(s["tokens"]) != 1 or not s["sample"] for s in seqs):
            return None
        return self.graphs.shape_for(len(seqs), max(s["start"] for s in seqs) + 1)

    @torch.inference_mode()
    def execute(self, plan: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
        """Run one step: every scheduled sequence's new tokens; sample where the plan asks."""
        seqs = plan["seqs"]
        self.sampler.forget(plan.get("finished", []))
        if not seqs:
            return [], {}
        dev = self.ctx.device
        n_tokens = sum(len(s["tokens"]) for s in seqs)
        graph = self._graph_shape(plan)
        if graph is None:
            ids = torch.tensor([t for s in seqs for t in s["tokens"]], dtype=torch.long)
            positions = torch.cat([torch.arange(s["start"], s["start"] + len(s["tokens"])) for s in seqs])
            q_lens = [len(s["tokens"]) for s in seqs]
            meta = build_metadata([s["start"] for s in seqs], q_lens, [s["blocks"] for s in seqs], self.block_size,
                                  dev, self.dtype)
        self.steps += 1
        self.graph_steps += graph is not None
        t0 = time.time()
        x = None
        if not self.ctx.is_first_stage:  # activations of the previous pipeline stage, same token order as the plan
            x = self.ctx.recv_prev_stage((n_tokens, self.spec.config.hidden_size), self.dtype)
            self._sync()
            self.record("recv activations", "communication", t0, time.time())
        t1 = time.time()
        if graph is not None:  # the last stage gets every sequence's logits, the others their activations
            out = self.graphs.run(graph, seqs, x)
        else:
            out = self.model(ids.to(dev, non_blocking=True) if x is None else x, positions.to(dev, non_blocking=True),
                             meta)
        issued = time.time()  # the host has queued every layer; the GPU may still be behind
        if self.moe:  # a device scalar per step: read when the stats are asked for, not now
            self.step_rows.append(sum(m.rows for m in self.moe.values()))  # a new tensor: 0 + rows + ...
            for m in self.moe.values():
                m.rows.zero_()
        kind = f"forward {n_tokens} tokens" + (" (graph)" if graph is not None else "")
        if not self.ctx.is_last_stage:
            self._sync()
            t2 = time.time()
            self.last_split = (issued - t1, t2 - issued)
            self.record(kind, "compute", t1, t2)
            self.ctx.send_next_stage(out)
            self._sync()
            self.record("send activations", "communication", t2, time.time())
            self.window = [self.window[0] if self.window else t0, time.time()]
            return [], {}

        rows = [i for i, s in enumerate(seqs) if s["sample"]]
        results: list[dict[str, Any]] = []
        arrays: dict[str, np.ndarray] = {}
        if rows:
            if graph is not None:
                logits = out  # [seqs, vocab]: every sequence samples in a graph step
            else:
                last = np.cumsum(q_lens) - 1  # flat index of each sequence's last new token
                logits = self.model.compute_logits(out[torch.as_tensor(last[rows], device=dev)])  # [n, vocab]
            if self.ctx.is_output_rank:
                chosen = [seqs[i] for i in rows]
                results = self.sampler.sample(logits, [s["id"] for s in chosen], [s["params"] for s in chosen])
                for res, s in zip(results, chosen):
                    res["id"] = s["id"]
                if plan.get("return_logits"):
                    arrays = {"logits": logits.cpu().numpy()}
        self._sync()
        t2 = time.time()
        self.last_split = (issued - t1, t2 - issued)
        self.record(kind + (" + sample" if rows else ""), "compute", t1, t2)
        self.window = [self.window[0] if self.window else t0, t2]
        return results, arrays

    def reset_expert_stats(self) -> None:
        self.step_rows.clear()
        for m in self.moe.values():
            m.tokens_per_expert.zero_()

    def reset_accounting(self) -> None:
        self.busy_s, self.window, self.events = 0.0, [], []
        self.steps = self.graph_steps = 0

    def accounting(self) -> dict[str, Any]:
        """Busy (compute) seconds and the wall window they fall in, since the last reset."""
        window = self.window[1] - self.window[0] if self.window else 0.0
        out = {"busy_s": self.busy_s, "window_s": window, "steps": self.steps, "graph_steps": self.graph_steps,
               "idle_fraction": 1.0 - self.busy_s / window if window > 0 else 0.0}
        if self.moe:  # routing: tokens per expert (each token counted once over the TP group)
            out["moe"] = {"tokens_per_expert": {i: m.tokens_per_expert.tolist() for i, m in self.moe.items()
                                                if m.counts_tokens},
                          # one device read for all steps (int() of each would wait on the GPU per step)
                          "step_rows": torch.stack(list(self.step_rows)).tolist() if self.step_rows else []}
        return out
