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
"""


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
