"""Check and time the peer-memory all-reduce against NCCL on the GPUs of this host (issue 17).

    python scripts/allreduce_bench.py [--world N] [--same-gpu] [--json out.json] [--save]

Spawns one process per rank; each sets up its TP group as the engine does (worker/distributed.py:
setup_all_reduce). Checks, for every size and path the dispatcher can pick: the one-shot and two-shot
results equal NCCL's (bf16; 2 ranks: bit for bit, more: within rounding), eagerly and replayed inside a CUDA
graph; the fused all-reduce + residual add + RMSNorm equals the all-reduce followed by the add + norm. Then
times, inside CUDA graphs, NCCL, one-shot, two-shot and the fused kernel per size, prints a table and the
limits the sweep implies (`--save`: where the engine reads them, as `shardlm probe` does).

`--same-gpu` puts every rank on GPU 0 (processes sharing one GPU: the kernels' correctness only, no times;
symmetric memory refuses ranks on one device, so the buffers are plain CUDA tensors shared between the
processes over CUDA IPC, and the reference sum goes through gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardlm.common.layout import ParallelLayout  # noqa: E402
from shardlm.worker.distributed import ParallelContext, setup_all_reduce  # noqa: E402
from shardlm.worker.kernels.allreduce import (  # noqa: E402
    NCCL,
    ONE_SHOT,
    TWO_SHOT,
    default_limits,
    measured_limits,
    save_limits,
)
from shardlm.worker.kernels.norm_act import add_rms_norm_triton  # noqa: E402

SIZES = [2 << 10, 16 << 10, 64 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20]
HIDDEN = 4096


def _graph_us(fn, iters: int = 50) -> float:
    """Mean us per fn() replayed inside one CUDA graph of `iters` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def _reference_sum(x: torch.Tensor, group, same_gpu: bool) -> torch.Tensor:
    if same_gpu:  # gloo on CPU copies, summed in float32 then rounded once, as the kernel does
        y = x.float().cpu()
        dist.all_reduce(y, group=group)
        return y.to(x.dtype).to(x.device)
    y = x.clone()
    dist.all_reduce(y, group=group)
    return y


def _shared_buffers(rank: int, world: int, queues, group):
    """--same-gpu: each rank's buffer a CUDA tensor on GPU 0, handed to the other ranks over CUDA IPC."""
    from shardlm.worker.kernels.triton_allreduce import PeerBuffers, buffer_bytes

    max_bytes = default_limits(world).max_bytes
    mine = torch.zeros(buffer_bytes(max_bytes), dtype=torch.uint8, device="cuda:0")
    for r in range(world):
        if r != rank:
            queues[r].put((rank, mine))
    theirs = dict(queues[rank].get() for _ in range(world - 1))
    torch.cuda.synchronize()
    dist.barrier(group=group)
    ptrs = [mine.data_ptr() if r == rank else theirs[r].data_ptr() for r in range(world)]
    return PeerBuffers(rank, ptrs, max_bytes, torch.device("cuda:0"), keep=(mine, theirs))


def _rank(rank: int, world: int, init: str, same_gpu: bool, out_path: str, save: bool, queues) -> None:
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    dev = torch.device("cuda", 0 if same_gpu else rank)
    torch.cuda.set_device(dev)
    backend = "gloo" if same_gpu else "nccl"
    kwargs = {} if same_gpu else {"device_id": dev}
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, **kwargs)
    group = dist.new_group(list(range(world)))
    ctx = ParallelContext(layout=ParallelLayout(tp=world), rank=rank, device=dev, tp_group=group)
    if same_gpu:
        ctx.peer, ctx.all_reduce_path = _shared_buffers(rank, world, queues, group), "CUDA IPC buffers on GPU 0"
    else:
        setup_all_reduce(ctx, custom=True)
    if rank == 0:
        print(f"world {world}{' (all on GPU 0)' if same_gpu else ''}: {ctx.all_reduce_path}", flush=True)
    peer = ctx.peer
    assert peer is not None, ctx.all_reduce_path
    gen = torch.Generator(device=dev).manual_seed(1234 + rank)
    failures, times = [], {NCCL: [], ONE_SHOT: [], TWO_SHOT: [], "fused": [], "unfused": []}
    exact = world == 2
    for nbytes in [b for b in SIZES if b <= peer.max_bytes]:
        n = nbytes // 2
        x = torch.randn(n, generator=gen, device=dev).to(torch.bfloat16)
        want = _reference_sum(x, group, same_gpu)
        for path in (ONE_SHOT, TWO_SHOT):
            got = peer.all_reduce(x.clone(), two_shot=path == TWO_SHOT)
            in_graph = x.clone()
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                peer.all_reduce(in_graph.clone(), two_shot=path == TWO_SHOT)  # warm-up (compiles)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                peer.all_reduce(in_graph, two_shot=path == TWO_SHOT)
            g.replay()
            for label, res in (("eager", got), ("graph", in_graph)):
                ok = torch.equal(res, want) if exact else torch.allclose(res.float(), want.float(), rtol=2e-2, atol=2e-2)
                if not ok:
                    diff = (res.float() - want.float()).abs().max().item()
                    failures.append(f"rank {rank} {path} {label} {nbytes} B: max |diff| {diff:.3g}")
        # the fused kernel against the all-reduce and then the add + norm (rows of HIDDEN)
        rows = n // HIDDEN
        if rows:
            part = x[: rows * HIDDEN].view(rows, HIDDEN)
            res = torch.randn(rows, HIDDEN, generator=gen, device=dev).to(torch.bfloat16)
            w = torch.randn(HIDDEN, generator=gen, device=dev).to(torch.bfloat16)
            summed = _reference_sum(part.clone(), group, same_gpu)
            want_out, want_res = add_rms_norm_triton(summed, res, w, 1e-5)
            got_out, got_res = peer.all_reduce_add_rms_norm(part.clone(), res, w, 1e-5)
            for label, a, b in (("normed", got_out, want_out), ("residual", got_res, want_res)):
                # the sum and the residual add round as the unfused kernels do (2 ranks: bit for bit); the
                # norm's row sum may add in another order: the normed row within a bf16 step
                ok = (torch.equal(a, b) if exact and label == "residual" else
                      torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2 if exact else 3e-2))
                if not ok:
                    failures.append(f"rank {rank} fused {label} {rows} rows: max |diff| "
                                    f"{(a.float() - b.float()).abs().max().item():.3g}")
        if same_gpu:
            continue
        times[NCCL].append([nbytes, _graph_us(lambda: dist.all_reduce(x, group=group))])
        times[ONE_SHOT].append([nbytes, _graph_us(lambda: peer.all_reduce(x, two_shot=False))])
        if world > 2:
            times[TWO_SHOT].append([nbytes, _graph_us(lambda: peer.all_reduce(x, two_shot=True))])
        if rows:
            times["fused"].append([nbytes, _graph_us(lambda: peer.all_reduce_add_rms_norm(part, res, w, 1e-5))])

            def unfused() -> None:
                dist.all_reduce(part, group=group)
                add_rms_norm_triton(part, res, w, 1e-5)

            times["unfused"].append([nbytes, _graph_us(unfused)])
    gathered: list = [None] * world
    dist.all_gather_object(gathered, failures, group=group)
    if rank == 0:
        problems = [f for fs in gathered for f in fs]
        report = {"world": world, "same_gpu": same_gpu, "path": ctx.all_reduce_path, "failures": problems,
                  "device": torch.cuda.get_device_name(dev)}
        print("checks:", "all equal" if not problems else f"{len(problems)} FAILED", flush=True)
        for p in problems[:20]:
            print("  ", p)
        if not same_gpu:
            sweep = {p: t for p, t in times.items() if t and p in (NCCL, ONE_SHOT, TWO_SHOT)}
            limits = measured_limits(sweep)
            report.update(times_us=times, limits={"one_shot_max_bytes": limits.one_shot_max,
                                                  "two_shot_max_bytes": limits.two_shot_max})
            print(f"{'bytes':>9} " + " ".join(f"{p:>9}" for p in times if times[p]) + "   (us in a CUDA graph)")
            for i, (nbytes, _) in enumerate(times[NCCL]):
                cells = []
                for p in times:
                    if times[p]:
                        hit = [us for b, us in times[p] if b == nbytes]
                        cells.append(f"{hit[0]:>9.2f}" if hit else f"{'-':>9}")
                print(f"{nbytes:>9} " + " ".join(cells))
            print(f"limits: one-shot up to {limits.one_shot_max} B, two-shot up to {limits.two_shot_max} B")
            if save:
                print("saved:", save_limits(torch.cuda.get_device_name(dev), world, limits))
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier(group=group)
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=None, help="ranks (default: every GPU; 2 with --same-gpu)")
    p.add_argument("--same-gpu", action="store_true", help="every rank on GPU 0 (correctness only)")
    p.add_argument("--json", default=None, help="write the checks and times here")
    p.add_argument("--save", action="store_true", help="save the measured limits where the engine reads them")
    args = p.parse_args()
    world = args.world or (2 if args.same_gpu else torch.cuda.device_count())
    if world < 2:
        print("allreduce_bench: needs 2 GPUs (or --same-gpu)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = args.json or os.path.join(tmp, "out.json")
        queues = [mp.get_context("spawn").SimpleQueue() for _ in range(world)]
        mp.spawn(_rank, args=(world, f"file://{tmp}/rendezvous", args.same_gpu, out, args.save, queues),
                 nprocs=world)
        with open(out) as f:
            return 1 if json.load(f)["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
