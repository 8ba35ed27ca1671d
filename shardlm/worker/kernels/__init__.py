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

Programmatic dependent launch (`pdl`, Hopper and later): the FP8 GEMM kernels (and the activation
quantisation) are launched so that their programs may start while the kernel before them is still running;
nothing in them reads their input or writes anything before `gdc_wait`, which returns once that kernel has
finished and its writes are visible (the one-row GEMV loads its first weight tile, which nothing writes,
before it). The kernels that come before them (the fused norm, SiLU x up, the quantisation, attention)
signal at their start (`gdc_launch_dependents`) that the next kernel may launch: what a decode step's small
GEMMs lose to launch and ramp-up then overlaps the kernel before them (2.5-3.5% of an 8B FP8 decode step at
batches 1 and 8 on an H200, docs/PERFORMANCE.md session 16).
"""

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


def pdl(device: torch.device) -> bool:
    """Whether kernels on `device` use programmatic dependent launch: a CUDA GPU of compute capability 9.0+
    (griddepcontrol), not Triton's CPU interpreter, not turned off (SHARDLM_NO_PDL=1)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or envs.no_pdl():
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())
