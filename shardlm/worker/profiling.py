"""Where a worker's time goes, recorded around the step rather than inside it.

- `StepTimer`: wall-clock spans of each step's phases (receive activations, compute, send): the busy
  seconds and step window behind the idle fraction (`shardlm bench`'s pipeline bubble), the host's
  split between queueing the layers and waiting for the GPU, and, when tracing, one event per span
  for the Chrome/Perfetto trace.
- `profile_step`: one step under torch.profiler, GPU time by kind of kernel (`shardlm bench --profile-step`).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..common.messages import StepPlan

if TYPE_CHECKING:
    from .model_runner import ModelRunner

MAX_EVENTS = 200_000
"""trace events kept per worker (a long traced run stops recording, it does not grow without bound)"""


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Span:
    """One timed phase; `issued()` marks when the host had queued all its work (the GPU may be behind)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = time.time()
        self.issued_at: float | None = None

    def issued(self) -> None:
        self.issued_at = time.time()


class StepTimer:
    """Wall-clock accounting of one worker's steps (seconds since the epoch, as the trace wants them)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tracing = False
        self.reset()

    def reset(self) -> None:
        self.busy_s = 0.0
        self.window: list[float] = []  # [first step start, last step end]
        self.events: list[tuple[str, str, float, float]] = []  # (name, category, start, end)
        self.busy_until = 0.0  # end of the last compute span (async scheduling opens the next one before it)
        self.steps = self.graph_steps = 0  # steps run, and of them replayed as graphs (or padded like one)
        # last compute span: (seconds the host took to queue the work, seconds from then to its end)
        self.last_split = (0.0, 0.0)

    def record(self, name: str, category: str, start: float, end: float) -> None:
        if category == "compute":
            self.busy_s += max(0.0, end - max(start, self.busy_until))
            self.busy_until = max(self.busy_until, end)
        if self.tracing and len(self.events) < MAX_EVENTS:
            self.events.append((name, category, start, end))

    def step(self, graph: bool) -> None:
        """A step begins: it counts, and opens (or extends) the window."""
        self.steps += 1
        self.graph_steps += graph
        now = time.time()
        self.window = [self.window[0] if self.window else now, now]

    def open(self, name: str) -> Span:
        """A compute span begins: it lasts until close(), once its device work is done."""
        return Span(name)

    def close(self, span: Span, category: str = "compute") -> None:
        """End a span whose device work has finished (the caller waited for it)."""
        end = time.time()
        if category == "compute":
            issued = span.issued_at if span.issued_at is not None else end
            self.last_split = (issued - span.start, end - issued)
        self.record(span.name, category, span.start, end)
        self.window[1] = end

    @contextmanager
    def span(self, name: str, category: str) -> Iterator[Span]:
        """Time the body up to the moment its device work is done (one synchronize at its end)."""
        span = Span(name)
        yield span
        synchronize(self.device)
        self.close(span, category)

    def accounting(self) -> dict[str, Any]:
        """Busy (compute) seconds and the wall window they fall in, since the last reset."""
        window = self.window[1] - self.window[0] if self.window else 0.0
        return {"busy_s": self.busy_s, "window_s": window, "steps": self.steps, "graph_steps": self.graph_steps,
                "idle_fraction": 1.0 - self.busy_s / window if window > 0 else 0.0}


def _kernel_kind(name: str) -> str:
    name = name.lower()
    # send/recv kernels are the MoE all-to-all (and the pipeline hand-off); the rest of NCCL is the TP
    # all-reduce / all-gather, as are the peer-memory kernels (_all_reduce_kernel, and
    # _all_reduce_add_norm_kernel with the residual add and norm it carries): a rank waits for the others there
    if "nccl" in name and "sendrecv" in name:
        return "send_recv"
    if "nccl" in name or "all_reduce" in name:
        return "communication"
    if any(k in name for k in ("attention", "fmha", "flash", "softmax")):  # before gemm: fmha_cutlass...
        return "attention"
    if any(k in name for k in ("gemm", "gemv", "fp8_dot", "fp8_tma", "nvjet", "cutlass", "matmul",
                                 "sm90")):  # (fp8_*: ours)
        return "gemm"
    return "other"


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The process's stderr (file descriptor 2) to /dev/null: the profiler's C++ side prints a line to it as
    it starts and stops (kineto's "USDT: ... profiler_start"), which the user did not ask for."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_step(runner: ModelRunner, plan: StepPlan) -> dict[str, Any]:
    """Run one step under torch.profiler; return GPU time per kind of kernel (us), the largest kernels and
    CPU ops, and the step's wall time. The step runs once before without the profiler, for the host's
    split between queueing the layers and waiting after them. Neither run counts in the routing
    statistics, nor in the sampler's state (seeded generators, penalty counts)."""
    from torch.profiler import ProfilerActivity, profile

    dev = runner.ctx.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    saved, sampler = runner.save_expert_stats(), runner.sampler.save_state()
    t0 = time.perf_counter()
    runner.execute(plan).finish()
    synchronize(dev)
    plain_wall = time.perf_counter() - t0
    issue, wait = runner.timer.last_split
    with _quiet_stderr(), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        runner.execute(plan).finish()
        synchronize(dev)
        wall = time.perf_counter() - t0
    runner.restore_expert_stats(saved)
    runner.sampler.restore_state(sampler)
    kinds = dict.fromkeys(("communication", "send_recv", "gemm", "attention", "other"), 0.0)
    kernels, cpu_ops = [], []
    for evt in prof.key_averages():
        if evt.device_type.name == "CPU" and evt.self_cpu_time_total > 0:
            cpu_ops.append((evt.self_cpu_time_total, evt.key, evt.count))
        us = getattr(evt, "self_device_time_total", 0.0) or 0.0
        if us <= 0 or evt.device_type.name != "CUDA":
            continue
        kernels.append((us, evt.key, evt.count))
        kinds[_kernel_kind(evt.key)] += us
    out: dict[str, Any] = {f"{k}_us": v for k, v in kinds.items()}
    out["gpu_busy_us"] = sum(kinds.values())
    out["wall_us"] = wall * 1e6
    out["unprofiled_wall_us"] = plain_wall * 1e6
    out["host_issue_us"], out["host_wait_us"] = issue * 1e6, wait * 1e6
    out["kernel_launches"] = sum(n for _, _, n in kernels)
    # the largest items, to say where a step's time goes: [name, us, calls]
    out["top_kernels"] = [[k[:120], round(us, 1), n] for us, k, n in sorted(kernels, reverse=True)[:12]]
    out["top_cpu_ops"] = [[k[:120], round(us, 1), n] for us, k, n in sorted(cpu_ops, reverse=True)[:12]]
    return out
