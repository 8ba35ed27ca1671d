"""Worker process entry point: one per rank, started by the launcher or by torchrun.

    python -m shardlm.worker.main            (env: SHARDLM_DRIVER=host:port, RANK, WORLD_SIZE, LOCAL_RANK)

The worker connects to the driver, receives its init message (layout, model, options), joins
the torch.distributed world, loads its shard and then executes step plans until told to stop.
Any failure is reported to the driver as a message before the process exits.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import sys
import time
import traceback

from ..common import wire


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


def serve(sock: socket.socket, rank: int, local_rank: int) -> None:
    import torch

    from ..common.layout import ParallelLayout
    from ..common.model_source import ModelSource
    from .distributed import init_distributed
    from .model_runner import ModelRunner

    init, _ = wire.recv(sock)
    layout = ParallelLayout(**init["layout"])
    if init["device"] == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
        # cuDNN's attention builds a plan for every new shape (~35-45 ms on the H100 host), and decode
        # makes a new shape every step (context + 1, batch changes): measured in docs/PERFORMANCE.md.
        # SHARDLM_CUDNN_SDPA=1 turns it back on.
        torch.backends.cuda.enable_cudnn_sdp(os.environ.get("SHARDLM_CUDNN_SDPA") == "1")
        # The host only builds small index tensors; torch's default intra-op pool (one thread per core
        # in every worker) made the hosts of a 4-worker node fight for cores: decode steps at batch >= 8
        # took 1.5-2.5x as long (docs/PERFORMANCE.md). SHARDLM_GPU_WORKER_THREADS=0 keeps torch's default.
        threads = int(os.environ.get("SHARDLM_GPU_WORKER_THREADS", "1"))
        if threads > 0:
            torch.set_num_threads(threads)
    else:
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(max(1, int(init.get("cpu_threads", 1))))
    ctx = init_distributed(layout, rank, backend, init["init_method"], device, init.get("timeout_s", 600),
                           stage_layers=[tuple(r) for r in init["stage_layers"]])
    spec = ModelSource.from_dict(init["model"])
    runner = ModelRunner(spec, ctx, getattr(torch, init["dtype"]), init["max_model_len"], init["block_size"],
                         init.get("expert_placement"), cuda_graphs=init.get("cuda_graphs", False) or (
                             # testing aid: the graphs' padded decode steps, run eagerly on the CPU
                             device.type == "cpu" and os.environ.get("SHARDLM_PADDED_DECODE_ON_CPU") == "1"),
                         max_num_seqs=init.get("max_num_seqs", 256),
                         max_seq_len_to_capture=init.get("max_seq_len_to_capture", 8192))
    load_s = runner.load(show_progress=rank == 0)
    cap = runner.kv_capacity(init["gpu_memory_utilization"], init["cpu_kv_cache_bytes"], init["profile_tokens"])
    runner.reset_expert_stats()  # the profiling forward's routing is not the user's
    runner.reset_accounting()  # the profiling forward is not part of the run
    runner.tracing = bool(init.get("trace"))
    wire.send(sock, {"event": "ready", "rank": rank, "load_s": load_s, "block_bytes": runner.block_bytes(), **cap})
    # what exists now (modules, parameters, imported libraries) lives as long as the worker: keep it out
    # of the cyclic collector's full passes, which otherwise stall a step now and then
    gc.collect()
    gc.freeze()

    # debugging aid: SHARDLM_CPROFILE_STEPS=N prints a cProfile of steps 10..10+N of rank 0 to stderr
    cprofile_steps = int(os.environ.get("SHARDLM_CPROFILE_STEPS", "0")) if rank == 0 else 0
    step_no = 0
    while True:
        t_wait = time.time()
        msg, _ = wire.recv(sock)
        cmd = msg["cmd"]
        if cmd == "step":
            runner.record("wait for plan", "idle", t_wait, time.time())
            step_no += 1
            t0 = time.perf_counter()
            if cprofile_steps and 10 <= step_no < 10 + cprofile_steps:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                results, arrays = prof.runcall(runner.execute, msg)
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(12)
            else:
                results, arrays = runner.execute(msg)
            if ctx.is_output_rank:
                wire.send(sock, {"event": "step", "results": results, "exec_s": time.perf_counter() - t0}, arrays)
        elif cmd == "profile_step":
            wire.send(sock, {"event": "profile", "rank": rank, **runner.execute_profiled(msg)})
        elif cmd == "probe":
            from . import probe

            result = probe.collectives(runner, msg["sizes"], msg["iters"])
            if msg.get("device_rates") and ctx.rank == 0:
                result.update(probe.device_rates(device))
            wire.send(sock, {"event": "probe", "rank": rank, **result})
        elif cmd == "stats":
            reply = {"event": "stats", "rank": rank, "pp": ctx.pp_rank, "tp": ctx.tp_rank, **runner.accounting()}
            if msg.get("events"):
                reply["events"] = runner.events
            if msg.get("reset"):
                runner.reset_accounting()
            if msg.get("reset_experts"):
                runner.reset_expert_stats()
            wire.send(sock, reply)
        elif cmd == "alloc_kv":
            runner.allocate_kv(msg["blocks"])
            wire.send(sock, {"event": "kv_ready", "rank": rank, **runner.capture_graphs()})
        elif cmd == "shutdown":
            break
        else:
            raise RuntimeError(f"unknown command {cmd!r} from driver")
    torch.distributed.destroy_process_group()


def main() -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when we stop
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    sock = _connect(os.environ["SHARDLM_DRIVER"])
    wire.send(sock, {"event": "hello", "rank": rank, "pid": os.getpid(), "host": socket.gethostname()})
    try:
        serve(sock, rank, local_rank)
    except wire.ConnectionClosed:
        return 0  # the driver went away: nothing left to do
    except Exception as exc:  # report every failure to the driver, which shows it to the user
        expected = isinstance(exc, ValueError)
        message = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        tb = "" if expected else traceback.format_exc()
        try:
            wire.send(sock, {"event": "error", "rank": rank, "message": message, "traceback": tb})
        except OSError:
            pass
        if tb:
            print(f"[shardlm worker {rank}] {tb}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
