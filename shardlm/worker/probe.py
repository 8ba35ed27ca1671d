"""Measurements taken inside the workers for `shardlm probe`, through the engine's own code paths.

- collectives on the TP group via ParallelContext (the path the layers use);
- the device: copy bandwidth and GEMM rate;
- `gemv_rate`: the one-row GEMM every rank times at start-up, the same on every rank, so the driver can
  name a rank that is slower than its peers (engine/stragglers.py).
(The host's time per layer and per step is timed from the driver, through whole engine steps:
shardlm/probe.py.)
"""

from __future__ import annotations

import math
import platform
import time
from typing import Any

import torch
import torch.distributed as dist

from .kernels import pdl_launches
from .kernels.allreduce import NCCL, ONE_SHOT, TWO_SHOT, measured_limits, save_limits
from .model_runner import ModelRunner
from .profiling import synchronize


def _timed(fn, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Mean seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / iters


def _graph_timed(fn, device: torch.device, iters: int) -> float:
    """Mean seconds per call of fn() replayed inside a CUDA graph of `iters` calls (no launch cost), captured
    as the decode graphs are (programmatic dependent launch: kernels.pdl_launches)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), pdl_launches():
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), pdl_launches():
        for _ in range(iters):
            fn()
    return _timed(graph.replay, device, 3, warmup=1) / iters


STRAGGLER_GEMV = {"cuda": (8192, 8192, torch.bfloat16), "cpu": (1024, 4096, torch.float32)}
"""the start-up GEMV's weight (rows, columns, dtype) per device type: 128 MiB on a GPU, past its L2 cache"""


def gemv_rate(device: torch.device, slowdown: int = 1) -> float:
    """GB/s of weight read by one [1, in] x [in, out] GEMM, the best of a few timed runs (a decode step's
    GEMMs are bound by this rate). `slowdown` > 1 (a testing aid, SHARDLM_SLOW_RANK) runs the GEMM that many
    times per timed call, as a device that much slower would take."""
    rows, cols, dtype = STRAGGLER_GEMV["cuda" if device.type == "cuda" else "cpu"]
    best = _best_gemv_s(torch.randn(rows, cols, device=device).to(dtype), slowdown)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the weight's memory, before the KV cache is sized
    return rows * cols * dtype.itemsize / best / 1e9


def _best_gemv_s(w: torch.Tensor, repeat: int) -> float:
    x = torch.randn(1, w.shape[1], device=w.device, dtype=w.dtype)

    def gemv() -> None:
        for _ in range(repeat):
            torch.nn.functional.linear(x, w)

    # the best of a few runs; more on the CPU, whose cores other processes share (a run the scheduler cut
    # into is longer: the best run is the device's own speed)
    runs = 3 if w.device.type == "cuda" else 9
    return min(_timed(gemv, w.device, iters=10, warmup=2 if i == 0 else 0) for i in range(runs))


def device_identity(device: torch.device) -> dict[str, Any]:
    """Which device a rank runs on, as a user finds it in nvidia-smi: index, name and PCI bus id."""
    if device.type != "cuda":
        return {"gpu_index": None, "device_name": "cpu", "bus_id": ""}
    props = torch.cuda.get_device_properties(device)
    bus = ""
    if hasattr(props, "pci_bus_id"):
        bus = f"{getattr(props, 'pci_domain_id', 0):08x}:{props.pci_bus_id:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
    return {"gpu_index": device.index if device.index is not None else torch.cuda.current_device(),
            "device_name": props.name, "bus_id": bus}


def collectives(runner: ModelRunner, sizes: list[int], iters: int) -> dict[str, Any]:
    """all-reduce, all-to-all and send/recv latency per message size on this rank's TP group; on GPU
    also the all-reduce replayed inside a CUDA graph (as decode steps run it)."""
    ctx = runner.ctx
    dev, dtype = ctx.device, runner.dtype
    out: dict[str, Any] = {"allreduce": [], "all_to_all": [], "send_recv": []}
    if ctx.tp_group is None:
        return out
    if dev.type == "cuda":
        out["allreduce_graph"] = []
    n = ctx.tp_size
    group_ranks = dist.get_process_group_ranks(ctx.tp_group)
    for nbytes in sizes:
        elems = max(n, nbytes // dtype.itemsize) // n * n
        x = torch.randn(elems, device=dev).to(dtype)
        y = torch.empty_like(x)
        out["allreduce"].append([elems * dtype.itemsize, _timed(lambda: ctx.all_reduce(x), dev, iters) * 1e6])
        if dev.type == "cuda":
            out["allreduce_graph"].append([elems * dtype.itemsize,
                                           _graph_timed(lambda: ctx.all_reduce(x), dev, iters) * 1e6])
        if ctx.peer is not None and elems * dtype.itemsize <= ctx.peer.max_bytes:  # each path on its own
            for path, fn in _paths(ctx, x).items():
                out.setdefault("allreduce_paths", {}).setdefault(path, []).append(
                    [elems * dtype.itemsize, _graph_timed(fn, dev, iters) * 1e6])
        out["all_to_all"].append([elems * dtype.itemsize, _timed(
            lambda: dist.all_to_all_single(y, x, group=ctx.tp_group), dev, iters) * 1e6])
        # ping-pong between the group's first two ranks; the others wait at the barrier
        first, second = group_ranks[0], group_ranks[1]

        def ping_pong() -> None:
            if ctx.rank == first:
                dist.send(x, second, group=ctx.tp_group)
                dist.recv(y, second, group=ctx.tp_group)
            elif ctx.rank == second:
                dist.recv(y, first, group=ctx.tp_group)
                dist.send(x, first, group=ctx.tp_group)

        round_trip = _timed(ping_pong, dev, iters)
        dist.barrier(group=ctx.tp_group)
        out["send_recv"].append([elems * dtype.itemsize, round_trip / 2 * 1e6])
    if "allreduce_paths" in out:  # where each path wins; saved where this host's workers read them at start-up
        limits = measured_limits(out["allreduce_paths"])
        out["allreduce_limits"] = {"one_shot_max_bytes": limits.one_shot_max, "two_shot_max_bytes": limits.two_shot_max}
        if ctx.tp_rank == 0:
            out["allreduce_limits"]["saved"] = str(save_limits(torch.cuda.get_device_name(dev), n, limits))
    return out


def _paths(ctx, x: torch.Tensor) -> dict[str, Any]:
    """The all-reduce's paths for x, each called directly (not through the limits): what the probe times to
    find the limits (kernels/allreduce.measured_limits); two-shot from 4 GPUs (with 2 it moves as much)."""
    paths = {NCCL: lambda: dist.all_reduce(x, group=ctx.tp_group),
             ONE_SHOT: lambda: ctx.peer.all_reduce(x, two_shot=False)}
    if ctx.tp_size > 2:
        paths[TWO_SHOT] = lambda: ctx.peer.all_reduce(x, two_shot=True)
    return paths


GEMV_SHAPES = [(4096, 1024), (4096, 4096), (14336, 4096), (28672, 4096)]
"""weights [out, in] of the one-row GEMMs timed: 8 MiB to Llama-3-8B's fused gate/up (224 MiB in bf16)"""
GEMV_STREAM_BYTES = 512 << 20
"""each size cycles through enough weight copies to read this much per round: far past the L2 cache, as
a decode step's weights stream through once"""


def _stream_copies(nbytes: int) -> int:
    """copies of an operand of nbytes a timing cycles through to read GEMV_STREAM_BYTES a round (at most 64)"""
    return max(1, min(64, -(-GEMV_STREAM_BYTES // nbytes)))


def _cycled_us(call, operands: list, device: torch.device, calls: int) -> float:
    """Microseconds of one call(*operand), each of `operands` (copies of one shape) in turn, replayed in a CUDA
    graph of about `calls` calls: the operands come from HBM, not from the L2 cache"""
    def one_round() -> None:
        for ops in operands:
            call(*ops)

    return _graph_timed(one_round, device, max(1, calls // len(operands))) / len(operands) * 1e6


def _gemm_times(device: torch.device, rows: int, fp8: bool, shapes: list[tuple[int, int]] = GEMV_SHAPES,
                handed: tuple[bool, ...] = ()) -> list[list[float]]:
    """[weight bytes, us] of a [rows, in] x [in, out] GEMM per [out, in] weight shape (GEMV_SHAPES by
    default), replayed in a CUDA graph past the L2 cache: bf16 through F.linear (cuBLAS, as the layers run
    it), or FP8 through the engine's FP8 path (layers/fp8.py fp8_linear_kernels; its activation quantisation
    included, but for the shapes `handed` marks, whose input the kernel before quantises where the engine's
    does: the fused norm or SiLU x up, takes_e4m3). A decode step's GEMMs at its batch: the planner reads a
    layer's weights at the time of its GEMMs' size and rows."""
    from .layers.fp8 import E4M3Rows, fp8_linear_kernels, quantize_rows, takes_e4m3

    out = []
    for i, (n, k) in enumerate(shapes):
        nbytes = n * k * (1 if fp8 else 2)
        copies = _stream_copies(nbytes)
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        if fp8:
            if i < len(handed) and handed[i] and takes_e4m3(fp8_linear_kernels, rows, n, k):
                from .kernels.triton_fp8 import quantize_activations

                x = E4M3Rows(*quantize_activations(x), x.dtype)
            ws = [quantize_rows(torch.randn(n, k, device=device) * 0.02) for _ in range(copies)]
            out.append([nbytes, _cycled_us(lambda w, s: fp8_linear_kernels(x, w, s), ws, device, 64)])
        else:
            ws = [(torch.randn(n, k, device=device, dtype=torch.bfloat16),) for _ in range(copies)]
            out.append([nbytes, _cycled_us(lambda w: torch.nn.functional.linear(x, w), ws, device, 64)])
    return out


GEMM_ROWS = (8, 32, 128)
"""decode batches at which the probe times the bf16 GEMMs beside the one-row GEMV ("gemv_rows")"""
FP8_GEMV_ROWS = (1, 8, 32, 64, 128)
"""decode batches at which the probe times the FP8 path (one row: the weight-only GEMV, a wide or large matrix's
on e4m3 activations (layers/fp8.py e4m3_activations); 8: e4m3 activations on
the swapped-operand tensor-core kernel; 32 and 64 (SMALL_M, the last on it): e4m3 activations, unswapped;
128: torch._scaled_mm, slower a row: a curve from 32 to 128 alone over-priced 64 rows by ~20%)"""


LAYER_GEMM_ROWS = (1, 8, 32, 64, 128)
"""decode batches (and short prefills) at which `probe --model` times a dense layer's own GEMMs"""


def layer_handed(runner: ModelRunner, rows: int) -> tuple[bool, bool, bool, bool]:
    """Of layer_gemm_shapes' qkv, o, gate_up and down at `rows` rows: whose FP8 input the kernel before
    quantises. SiLU x up's for down; the norms' for qkv and gate_up, unless the TP all-reduce kernel carries
    them (distributed.py norm_in_all_reduce: its output comes in the model dtype); o_proj's input comes from
    attention: it quantises its own."""
    ctx = runner.ctx
    x = torch.empty(rows, runner.source.config.hidden_size, dtype=runner.dtype, device=ctx.device)
    norm = not ctx.norm_in_all_reduce(x)
    return norm, False, norm, True


def layer_gemm_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """[out, in] of this rank's qkv, o, gate_up and down weights in the first decoder layer with a dense
    (gated) MLP; [] if the stage has none (MoE layers only)."""
    from .layers.linear import GatedMLP

    for m in model.modules():
        mlp, attn = getattr(m, "mlp", None), getattr(m, "self_attn", None)
        if isinstance(mlp, GatedMLP) and attn is not None:
            return [tuple(lin.weight.shape) for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    return []


def layer_gemm_times(runner: ModelRunner) -> dict[str, dict[str, float]]:
    """{"bf16": {rows: us}, "fp8": {rows: us}}: one dense layer's four GEMMs (this model's own shapes on this
    rank) at LAYER_GEMM_ROWS rows, as _gemm_times runs them (bf16 through F.linear; on a GPU with FP8 tensor
    cores the FP8 path too, the inputs layer_handed marks quantised before); {} off a GPU, without a dense
    layer, or where the weights' copies do not fit beside the engine (the planner keeps the weight-size curves
    then)."""
    from .layers.fp8 import scaled_mm_ok

    dev = runner.ctx.device
    shapes = layer_gemm_shapes(runner.model)
    if dev.type != "cuda" or not shapes:
        return {}
    formats = [("bf16", False)] + ([("fp8", True)] if scaled_mm_ok(dev) else [])
    try:
        return {name: {str(m): sum(us for _, us in _gemm_times(dev, m, fp8, shapes, layer_handed(runner, m)))
                       for m in LAYER_GEMM_ROWS} for name, fp8 in formats}
    except torch.cuda.OutOfMemoryError:
        return {}
    finally:
        torch.cuda.empty_cache()


GRAPH_BATCHES = (1, 8, 32, 128)
"""decode batches at which `probe --model` replays the engine's own decode graphs (decode_graph_times)"""


def decode_graph_times(runner: ModelRunner, iters: int = 20) -> dict[str, float]:
    """{batch: us}: one decode step of the engine's captured CUDA graph at each of GRAPH_BATCHES sequences (the
    graph of that batch with the least context), on its warm-up inputs: every row at position 0, so attention
    reads one key (attention_times times it on its own); the layers' GEMMs, small kernels and collectives and
    the LM head at that batch, replayed back to back: GPU time, no host work, no sampler. {} without captured
    decode graphs (CPU, eager engines, a pipeline stage's graphs differ in nothing here). Every rank of the
    group calls it (the graphs hold the TP all-reduces); rank 0's answer is the one read."""
    graphs = runner.graphs
    if graphs is None or not graphs.graphs:
        return {}
    out = {}
    for b in GRAPH_BATCHES:
        shapes = [shape for shape in graphs.graphs if shape[0] == b]
        if shapes:
            out[str(b)] = graphs.replay_us(min(shapes, key=lambda shape: shape[1]), iters)
    return out


ATTENTION_BATCHES = (1, 8, 32, 128)
ATTENTION_CONTEXTS = (128, 512, 2048, 8192)
ATTENTION_MAX_BYTES = 4 << 30
"""the K and V of one timed shape at most (a batch of 128 at 8k tokens of Llama-3-8B's heads is past it)"""


def attention_times(runner: ModelRunner, kv_dtype: torch.dtype | None = None) -> dict[str, list[list[float]]]:
    """{batch: [[context, us], ...]}: one layer's decode attention on this rank's heads (the engine's Triton
    kernels, split-KV as a step plans it, the KV in `kv_dtype`: the cache's by default, float8_e4m3fn for what
    an FP8 cache would take) for ATTENTION_BATCHES sequences of
    ATTENTION_CONTEXTS tokens each, replayed in a CUDA graph over enough copies of the K/V that they come from
    HBM, as a step's layers read theirs (one copy replayed can stay in the L2 cache: with one copy, batch 64
    interpolated 16% under the engine's profiled attention, session 17); {} where the engine's attention is
    not the kernels (CPU, the torch path): the planner prices the KV read then."""
    from .kernels.paged_attention import build_metadata, paged_attention_triton

    if runner.attention_backend != "triton":
        return {}
    dev, heads, bs = runner.ctx.device, runner.heads, runner.block_size
    kv_dtype = kv_dtype or runner.kv_dtype
    out: dict[str, list[list[float]]] = {}
    for b in ATTENTION_BATCHES:
        points = []
        for c in ATTENTION_CONTEXTS:
            blocks = -(-c // bs)
            shape = (b * blocks * bs, heads.n_kv, heads.head_dim)
            kv_bytes = 2 * math.prod(shape) * kv_dtype.itemsize
            if kv_bytes > ATTENTION_MAX_BYTES:
                continue
            try:
                kvs = [[torch.randn(shape, device=dev, dtype=runner.dtype).to(kv_dtype) for _ in range(2)]
                       for _ in range(_stream_copies(kv_bytes))]
            except torch.cuda.OutOfMemoryError:  # (beside the engine's own memory: the shapes that fit)
                torch.cuda.empty_cache()
                continue
            tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(b)]
            meta = build_metadata([c - 1] * b, [1] * b, tables, bs, dev, runner.dtype, "triton", heads, runner.sms)
            meta.workspace = runner.attn_workspace
            q = torch.randn(b, heads.n_q, heads.head_dim, device=dev, dtype=runner.dtype)
            points.append([c, _cycled_us(lambda k, v: paged_attention_triton(q, k, v, meta, heads), kvs, dev, 20)])
            kvs.clear()  # (before the next shape's copies are made)
        if points:
            out[str(b)] = points
    torch.cuda.empty_cache()
    return out


def device_rates(device: torch.device) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written) and matrix-multiply rate of this rank's device; on GPU the
    decode GEMMs' times too (bf16 at 1 and GEMM_ROWS rows, FP8 at FP8_GEMV_ROWS)."""
    gpu = device.type == "cuda"
    nbytes = (1 << 30) if gpu else (1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = _timed(lambda: dst.copy_(src), device, iters=20 if gpu else 5)
    n = 8192 if gpu else 1024
    dtype = torch.bfloat16 if gpu else torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    gemm_s = _timed(lambda: a @ b, device, iters=20 if gpu else 3)
    out: dict[str, Any] = {"hbm_gbps": 2 * nbytes / copy_s / 1e9, "gemm_tflops": 2 * n ** 3 / gemm_s / 1e12}
    if gpu:
        out["gemv"] = _gemm_times(device, 1, fp8=False)
        out["gemv_rows"] = {str(m): _gemm_times(device, m, fp8=False) for m in GEMM_ROWS}
        from .layers.fp8 import scaled_mm_ok

        if scaled_mm_ok(device):  # (FP8 tensor cores)
            out["gemv_fp8"] = {str(m): _gemm_times(device, m, fp8=True) for m in FP8_GEMV_ROWS}
        props = torch.cuda.get_device_properties(device)
        out["device_info"] = {"device": props.name, "gpu_count": torch.cuda.device_count(),
                              "memory_gib": props.total_memory / 2**30}
    else:
        out["device_info"] = {"device": f"cpu ({platform.processor() or platform.machine()})"}
    return out
