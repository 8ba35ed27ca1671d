"""shardlm's own GPU kernels (Triton), each behind a Python function with the same signature as the torch
reference it replaces; the reference runs on the CPU and in CI and is what the GPU tests compare against.

- paged_attention.py: attention over the paged KV cache for a flat varlen batch (metadata, launch plan,
  `paged_attention_torch` / `paged_attention_triton`); its kernels in triton_attention.py.
- rope_cache.py: rotary of q and k plus the K/V cache write (`rope_and_cache_torch` / `_triton`); its
  kernel in triton_rope.py.
- norm_act.py: residual add + RMSNorm, SiLU x up; kernels in triton_norm_act.py.
- allreduce.py: the TP all-reduce's paths and limits, the torch reference of the fused all-reduce + add +
  RMSNorm; the peer-memory kernels in triton_allreduce.py.

The triton_* modules import triton and are loaded only on the triton path.

Programmatic dependent launch (`pdl`, Hopper and later), in the decode steps' CUDA graphs (captured within
`pdl_launches()`): the Triton kernels of the step (the fused norm and SiLU x up, rotary + cache write,
attention and its combine, the FP8 GEMMs and the activation quantisation; not the peer all-reduce's) are
launched so that each one's programs may start while the kernel before it is still running, and each lets
the kernel after it launch as soon as it has started (triton_pdl.py `pdl_start`: `gdc_wait`, then
`gdc_launch_dependents`). Nothing in them reads their input or writes anything before `gdc_wait`, which
returns once the kernel before has finished and its writes are visible (the one-row FP8 GEMV loads its
first weight tile, which nothing writes, before it). Since every program of every such kernel waits, a
kernel's completion implies its predecessors'. Kernels that torch, cuBLAS or NCCL launch (and the peer
all-reduce) are launched the usual way and wait for the kernel before them to finish. What a decode step's
small kernels lose to launch and ramp-up then overlaps the kernel before them: an 8B decode step at batch 1
on an H200, FP8 6% shorter, bf16 1.5%. Steps with prompt tokens (the mixed graphs, eager steps) launch the
usual way: with PDL their time to first token grew 2-6% (0.4-1.0 ms at 128 and 1024 prompt tokens;
docs/PERFORMANCE.md session 17).
"""

import contextlib
import functools
import os

import torch

from ...common import envs


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


_pdl_on = False


@contextlib.contextmanager
def pdl_launches():
    """Within: the kernels launched use programmatic dependent launch where `pdl` allows (the decode graphs
    are captured within; so are the probe's and the benchmarks' timings of decode-sized kernels)."""
    global _pdl_on
    before, _pdl_on = _pdl_on, True
    try:
        yield
    finally:
        _pdl_on = before


def pdl(device: torch.device) -> bool:
    """Whether a kernel launched now on `device` uses programmatic dependent launch: within `pdl_launches`, on a
    CUDA GPU of compute capability 9.0+ (griddepcontrol), not Triton's CPU interpreter, not turned off
    (SHARDLM_NO_PDL=1)."""
    if not _pdl_on or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or envs.no_pdl():
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())
