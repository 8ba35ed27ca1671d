"""Every SHARDLM_* environment variable, in one place. Each is read when its function is called, never
at import: a test or a launcher may set one after shardlm is imported, and the workers (separate
processes) inherit the driver's environment.

| variable | read by | meaning |
| --- | --- | --- |
| SHARDLM_DRIVER | worker | host:port of the driver a worker connects to (set by the driver, or by hand under torchrun) |
| SHARDLM_DRIVER_TOKEN | worker, driver | the secret a worker shows the driver in its hello (hex). The driver makes a fresh one per worker group for the workers it spawns; with external workers it uses this variable when set (the same value on both sides), else makes one and prints it beside SHARDLM_DRIVER |
| SHARDLM_CACHE | driver | folder for downloaded models and converted tokenizers (default ~/.cache/shardlm) |
| SHARDLM_CUDNN_SDPA | worker | 1: let torch pick cuDNN attention (off: it re-plans on every new shape) |
| SHARDLM_GPU_WORKER_THREADS | worker | torch intra-op threads of a GPU worker (default 1; 0: torch's default) |
| SHARDLM_UNFUSED | worker | 1: with the Triton attention kernels, keep the residual add + RMSNorm and SiLU x up on their unfused torch ops (measuring the fusions) |
| SHARDLM_FP8_REFERENCE | worker | 1: FP8 linear layers on a GPU multiply by their dequantised weights (the reference path) instead of the FP8 kernels (checking the kernels' accuracy) |
| SHARDLM_NO_FP8_FUSION | worker | 1: FP8 layers on e4m3 activations quantise their own input (the RMSNorm and SiLU x up before them hand it over in the model dtype; measuring the fusion, layers/fp8.py `takes_e4m3`) |
| SHARDLM_NO_PDL | worker | 1: launch the Triton kernels without programmatic dependent launch (measuring it; kernels/__init__.py's `pdl`) |
| SHARDLM_NO_MOE_GRAPHS | worker | 1: MoE models' steps run eagerly (no CUDA graphs for them; measuring the graphs) |
| SHARDLM_NO_STEP_GRAPHS | worker | 1: steps with prompt chunks run eagerly (no mixed-step CUDA graphs; measuring them) |
| SHARDLM_CTX_BUCKET | worker | eager attention pads the gathered context to a multiple of this (default 1: none) |
| SHARDLM_EP_PADDED_MAX_ROWS | worker | expert parallelism: all-to-all of at most this many rows uses padded fixed-size buffers (default 1024; 0: always exact splits) |
| SHARDLM_PADDED_DECODE_ON_CPU | worker | testing aid: run the CUDA graphs' padded decode steps eagerly on the CPU |
| SHARDLM_CPROFILE_STEPS | worker | debugging aid: N > 0 prints a cProfile of rank 0's steps 10 .. 10 + N to stderr |
| SHARDLM_SLOW_RANK | worker | testing aid: `R:F` makes rank R's start-up GEMV (the straggler check) run F times per timed call, as a device F times slower would |
| SHARDLM_FAULT_INJECT | worker | testing aid: `rank=R,step=N,point=P,action=A` makes rank R kill (A=kill: SIGKILL) or stop (A=stall: SIGSTOP) itself in its N-th step (counting the step plans it received, from 1) at point P: `step` (before the step runs), `stage_send` (before sending activations to the next pipeline stage) or `all_to_all` (before an expert-parallel MoE dispatch). The driver passes it only to the first worker group it spawns in a run (worker/faults.py) |
"""

from __future__ import annotations

import os
from pathlib import Path


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def _flag(name: str) -> bool:
    return os.environ.get(name, "") == "1"


def driver_address() -> str:
    """SHARDLM_DRIVER: host:port of the driver (a worker cannot start without it)."""
    address = os.environ.get("SHARDLM_DRIVER")
    if not address:
        raise ValueError("SHARDLM_DRIVER is not set: a worker needs the driver's host:port (the driver sets it "
                         "for the workers it spawns; under torchrun, export the address the driver printed)")
    return address


def driver_token(required: bool) -> str:
    """SHARDLM_DRIVER_TOKEN: the secret of the worker's hello ("" when unset and not required)."""
    token = os.environ.get("SHARDLM_DRIVER_TOKEN", "")
    if required and not token:
        raise ValueError("SHARDLM_DRIVER_TOKEN is not set: a worker shows the driver its token (the driver sets it "
                         "for the workers it spawns; under torchrun, export the token the driver printed)")
    return token


def cache_root() -> Path:
    """SHARDLM_CACHE, else ~/.cache/shardlm."""
    return Path(os.environ.get("SHARDLM_CACHE") or Path.home() / ".cache" / "shardlm")


def cudnn_sdpa() -> bool:
    """SHARDLM_CUDNN_SDPA=1."""
    return _flag("SHARDLM_CUDNN_SDPA")


def unfused() -> bool:
    """SHARDLM_UNFUSED=1."""
    return _flag("SHARDLM_UNFUSED")


def slowdown(rank: int) -> int:
    """SHARDLM_SLOW_RANK=R:F: F for rank R, else 1."""
    raw = os.environ.get("SHARDLM_SLOW_RANK", "")
    if not raw:
        return 1
    r, sep, f = raw.partition(":")
    try:
        slow_rank, factor = int(r), int(f)
    except ValueError:
        slow_rank, factor = -1, 0
    if not sep or slow_rank < 0 or factor < 1:
        raise ValueError(f"SHARDLM_SLOW_RANK={raw!r} must be RANK:FACTOR, two integers (rank >= 0, factor >= 1)")
    return factor if rank == slow_rank else 1


def fp8_reference() -> bool:
    return _flag("SHARDLM_FP8_REFERENCE")


def no_fp8_fusion() -> bool:
    """SHARDLM_NO_FP8_FUSION=1."""
    return _flag("SHARDLM_NO_FP8_FUSION")


def no_pdl() -> bool:
    """SHARDLM_NO_PDL=1."""
    return _flag("SHARDLM_NO_PDL")


def no_moe_graphs() -> bool:
    """SHARDLM_NO_MOE_GRAPHS=1."""
    return _flag("SHARDLM_NO_MOE_GRAPHS")


def no_step_graphs() -> bool:
    """SHARDLM_NO_STEP_GRAPHS=1."""
    return _flag("SHARDLM_NO_STEP_GRAPHS")


def gpu_worker_threads() -> int:
    """SHARDLM_GPU_WORKER_THREADS (default 1; 0 keeps torch's default pool)."""
    return _int("SHARDLM_GPU_WORKER_THREADS", 1)


def ctx_bucket() -> int:
    """SHARDLM_CTX_BUCKET (default 1)."""
    return max(1, _int("SHARDLM_CTX_BUCKET", 1))


def ep_padded_max_rows() -> int:
    """SHARDLM_EP_PADDED_MAX_ROWS (default 1024)."""
    return _int("SHARDLM_EP_PADDED_MAX_ROWS", 1024)


def padded_decode_on_cpu() -> bool:
    """SHARDLM_PADDED_DECODE_ON_CPU=1."""
    return _flag("SHARDLM_PADDED_DECODE_ON_CPU")


def cprofile_steps() -> int:
    """SHARDLM_CPROFILE_STEPS (default 0: off)."""
    return _int("SHARDLM_CPROFILE_STEPS", 0)


def fault_inject() -> str:
    """SHARDLM_FAULT_INJECT (default "": no fault); worker/faults.py parses it."""
    return os.environ.get("SHARDLM_FAULT_INJECT", "")
