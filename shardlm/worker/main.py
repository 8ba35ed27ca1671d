"""Worker process entry point: one per rank, started by the launcher or by torchrun.

    python -m shardlm.worker.main    (env: SHARDLM_DRIVER=host:port, SHARDLM_DRIVER_TOKEN, RANK, WORLD_SIZE, LOCAL_RANK)

The worker connects to the driver, says hello with the driver's token, receives its `WorkerInit`
(layout, model, options), joins the torch.distributed world, loads its shard, answers `WorkerReady`,
then runs what the driver sends (common.messages: a `StepPlan` or a `Command`) through one table,
`HANDLERS`, until told to stop. Any failure is reported to the driver as a message before the
process exits. SHARDLM_FAULT_INJECT (worker/faults.py) can make a chosen rank die or stall, for tests.
"""

from __future__ import annotations

import ctypes
import gc
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

from ..common import envs, wire
from ..common.layout import ParallelLayout
from ..common.messages import (
    DRIVER_MESSAGES,
    AllocateKV,
    Probe,
    ProfileStep,
    Shutdown,
    Stats,
    StepMasks,
    StepPlan,
    WorkerInit,
    WorkerReady,
)
from . import faults

if TYPE_CHECKING:
    from .model_runner import PendingStep


def _die_with_parent() -> None:
    """Linux: get SIGKILL if the process that started us dies, so no worker outlives its driver."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _connect(address: str, timeout_s: float = 60.0) -> socket.socket:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Worker:
    """One rank: its model runner and the handlers of the driver's messages."""

    def __init__(self, sock: socket.socket, rank: int, local_rank: int, init: WorkerInit):
        import torch

        from .distributed import init_distributed
        from .model_runner import ModelRunner

        self.sock, self.rank = sock, rank
        opts = init.options
        layout = ParallelLayout(**init.layout)
        if opts.device == "cuda":
            # never multicast (NVLS, multimem): on shared hosts it can take GPUs out of service; set before
            # NCCL or symmetric memory starts, whatever the environment says
            os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
            # cuDNN's attention builds a plan for every new shape (~35-45 ms on the H100 host), and decode
            # makes a new shape every step (context + 1, batch changes): measured in docs/PERFORMANCE.md.
            torch.backends.cuda.enable_cudnn_sdp(envs.cudnn_sdpa())
            # The host only builds small index tensors; torch's default intra-op pool (one thread per core
            # in every worker) made the hosts of a 4-worker node fight for cores: decode steps at batch >= 8
            # took 1.5-2.5x as long (docs/PERFORMANCE.md).
            if envs.gpu_worker_threads() > 0:
                torch.set_num_threads(envs.gpu_worker_threads())
        else:
            device = torch.device("cpu")
            backend = "gloo"
            torch.set_num_threads(max(1, opts.cpu_threads))
        self.ctx = init_distributed(layout, rank, backend, init.init_method, device, opts.timeout_s,
                                    stage_layers=opts.stage_layers, custom=opts.custom_all_reduce)
        self.ctx.fuse_norm = not envs.unfused()
        # testing aid: the graphs' padded decode steps, run eagerly on the CPU
        graphs = opts.cuda_graphs or (device.type == "cpu" and envs.padded_decode_on_cpu())
        self.runner = ModelRunner(init.model, self.ctx, getattr(torch, opts.dtype), opts.max_model_len,
                                  opts.block_size, opts.expert_placement, cuda_graphs=graphs,
                                  max_num_seqs=opts.max_num_seqs, max_seq_len_to_capture=opts.max_seq_len_to_capture,
                                  attention_backend=opts.attention_backend,
                                  async_scheduling=opts.async_scheduling, max_step_tokens=opts.profile_tokens,
                                  kv_cache_dtype=opts.kv_cache_dtype)
        self.async_scheduling = opts.async_scheduling
        self.load_s = self.runner.load(show_progress=rank == 0)
        # the same GEMV on every rank, before the KV cache is sized: the driver names a rank slower than its peers
        from . import probe
        self.device_check = {"gemv_gbps": self._gemv_rate(device, layout.world_size), **probe.device_identity(device)}
        self.capacity = self.runner.kv_capacity(opts.gpu_memory_utilization, opts.cpu_kv_cache_bytes,
                                                opts.profile_tokens)
        self.runner.reset_expert_stats()  # the profiling forward's routing is not the user's
        self.runner.timer.reset()  # the profiling forward is not part of the run
        self.runner.timer.tracing = opts.trace
        # debugging aid: SHARDLM_CPROFILE_STEPS=N prints a cProfile of steps 10..10+N of rank 0 to stderr
        self.cprofile_steps = envs.cprofile_steps() if rank == 0 else 0
        self.step_no = 0
        self.last_finish = 0.0  # time.perf_counter() when the last step was answered

    def _gemv_rate(self, device, world: int) -> float:
        """This rank's start-up GEMV rate (probe.gemv_rate). CPU ranks share the host's cores and memory: they
        time it in turn (a barrier between turns), so that no rank's number is another's load"""
        import torch.distributed as dist

        from . import probe

        if device.type != "cpu" or world == 1:
            return probe.gemv_rate(device, envs.slowdown(self.rank))
        rate = 0.0
        for turn in range(world):
            dist.barrier()
            if turn == self.rank:
                rate = probe.gemv_rate(device, envs.slowdown(self.rank))
        dist.barrier()
        return rate

    def ready(self) -> WorkerReady:
        return WorkerReady(rank=self.rank, load_s=self.load_s, block_bytes=self.runner.block_bytes(),
                           attention_backend=self.runner.attention_backend, all_reduce_path=self.ctx.all_reduce_path,
                           **self.capacity, **self.device_check)

    def reply(self, event: str, **body: Any) -> None:
        wire.send(self.sock, {"type": event, "rank": self.rank, **body})

    # ---- handlers: one per message the driver sends --------------------------------------------
    def step(self, plan: StepPlan) -> PendingStep:
        """Queue the plan's step on the device; `finish` answers it."""
        self.step_no += 1
        if faults.armed is not None:
            faults.armed.step_started()
        if self.cprofile_steps and 10 <= self.step_no < 10 + self.cprofile_steps:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            pending = prof.runcall(self.runner.execute, plan)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(12)
            return pending
        return self.runner.execute(plan)

    def finish(self, pending: PendingStep) -> None:
        """Wait for a queued step; the output rank answers it (every step). Its exec_s counts from its launch,
        or from the end of the step before if it was launched while that one ran (async scheduling)."""
        result = pending.finish()
        now = time.perf_counter()
        if result is not None:
            result.exec_s = now - max(pending.started, self.last_finish)
            wire.send_message(self.sock, result)
        self.last_finish = now

    def next_plan_first(self, pending: PendingStep) -> bool:
        """Async scheduling: whether the driver's next message arrives while the device still runs `pending`
        (then the worker queues it before answering, so the device goes straight on to it). Polls the socket
        until either happens."""
        if not self.async_scheduling:
            return False
        while not pending.ready():
            if select.select([self.sock], [], [], 0.0002)[0]:
                return True
        return False

    def allocate_kv(self, cmd: AllocateKV) -> None:
        self.runner.allocate_kv(cmd.blocks)
        self.reply(cmd.name, **self.runner.capture_graphs())

    def stats(self, cmd: Stats) -> None:
        reply = {"pp": self.ctx.pp_rank, "tp": self.ctx.tp_rank, **self.runner.accounting()}
        if cmd.events:
            reply["events"] = self.runner.timer.events
        if cmd.reset:
            self.runner.timer.reset()
        if cmd.reset_experts:
            self.runner.reset_expert_stats()
        self.reply(cmd.name, **reply)

    def probe(self, cmd: Probe) -> None:
        import torch

        from . import probe
        from .layers.fp8 import scaled_mm_ok

        result = probe.collectives(self.runner, cmd.sizes, cmd.iters)
        if cmd.device_rates and self.ctx.rank == 0:
            result.update(probe.device_rates(self.ctx.device))
        if cmd.model_kernels:
            result["attention"] = probe.attention_times(self.runner)
            if scaled_mm_ok(self.ctx.device) and self.runner.kv_dtype != torch.float8_e4m3fn:
                result["attention_fp8"] = probe.attention_times(self.runner, torch.float8_e4m3fn)  # an FP8 cache's
            result["layer_gemms"] = probe.layer_gemm_times(self.runner)
        if cmd.graph_times:
            result["decode_graph_us"] = probe.decode_graph_times(self.runner)
        self.reply(cmd.name, **result)

    def profile_step(self, cmd: ProfileStep) -> None:
        from .profiling import profile_step

        self.reply(cmd.name, **profile_step(self.runner, cmd.plan))


HANDLERS: dict[type, Callable[[Worker, Any], None]] = {
    AllocateKV: Worker.allocate_kv,
    Stats: Worker.stats,
    Probe: Worker.probe,
    ProfileStep: Worker.profile_step,
}
"""What the worker does with each command (a StepPlan goes through Worker.step and Worker.finish, Shutdown ends
the loop); the driver sends them (engine/executor.py)."""


def serve(sock: socket.socket, rank: int, local_rank: int) -> None:
    import torch

    try:
        init = wire.recv_message(sock, {WorkerInit.name: WorkerInit})
    except wire.ConnectionClosed:
        print(f"[shardlm worker {rank}] the driver closed the connection before giving this worker its work: it "
              f"failed to start, or refused the hello (is SHARDLM_DRIVER_TOKEN the token the driver printed?)",
              file=sys.stderr, flush=True)
        raise
    faults.arm(rank, ParallelLayout(**init.layout).world_size)
    worker = Worker(sock, rank, local_rank, init)
    wire.send_message(sock, worker.ready())
    # what exists now (modules, parameters, imported libraries) lives as long as the worker: keep it out
    # of the cyclic collector's full passes, which otherwise stall a step now and then
    gc.collect()
    gc.freeze()
    pending = None  # the step queued on the device and not yet answered
    while True:
        if pending is not None and not worker.next_plan_first(pending):
            worker.finish(pending)
            pending = None
        t_wait = time.time()
        msg = wire.recv_message(sock, DRIVER_MESSAGES)
        if isinstance(msg, StepPlan):
            if pending is None:
                worker.runner.timer.record("wait for plan", "idle", t_wait, time.time())
            queued = worker.step(msg)
            if pending is not None:  # the older step is answered first; the device is busy with the new one
                worker.finish(pending)
            if queued.awaits_masks:  # the driver sends them once it has that answer; the forward runs meanwhile
                msg = wire.recv_message(sock, DRIVER_MESSAGES)
                if isinstance(msg, Shutdown):
                    break
                if not isinstance(msg, StepMasks):
                    raise RuntimeError(f"the driver sent {msg.name!r} where the masks of the step before were due")
                queued.take_masks(msg)
            pending = queued
            continue
        if pending is not None:  # a command sees every step answered
            worker.finish(pending)
            pending = None
        if isinstance(msg, Shutdown):
            break
        HANDLERS[type(msg)](worker, msg)
    torch.distributed.destroy_process_group()


def main() -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when we stop
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    token = envs.driver_token(required=True)
    sock = _connect(envs.driver_address())
    wire.send(sock, {"type": "hello", "rank": rank, "token": token, "pid": os.getpid(), "host": socket.gethostname()})
    try:
        serve(sock, rank, local_rank)
    except wire.ConnectionClosed:
        return 0  # the driver went away: nothing left to do
    except Exception as exc:  # report every failure to the driver, which shows it to the user
        expected = isinstance(exc, ValueError)
        message = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        tb = "" if expected else traceback.format_exc()
        try:
            wire.send(sock, {"type": "error", "rank": rank, "message": message, "traceback": tb})
        except OSError:
            pass
        if tb:
            print(f"[shardlm worker {rank}] {tb}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
