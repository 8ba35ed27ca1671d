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

Programmatic dependent launch (`pdl`, Hopper and later): the FP8 GEMM kernels are launched so that their
programs may start while the kernel before them is still running; they read their weights (which nothing
writes) before `gdc_wait`, and their input only after it, which returns once that kernel has finished and its
writes are visible. The kernels that come before them (the fused norm, SiLU x up, the activation
quantisation, attention) signal early (`gdc_launch_dependents`) that the next kernel may start: what a decode
step's small GEMMs lose to launch and ramp-up is then overlapped with the kernel before them.
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
