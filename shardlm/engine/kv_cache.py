"""How big the KV cache is: the driver's half of the sizing (the workers measure what fits on their
device: ModelRunner.kv_capacity), in one place.

1. Before the workers start: what they are told to measure with (`worker_budget`): the CPU cache size,
   and how many tokens the profiling forward runs (its peak activation memory is kept free on a GPU).
2. From their replies (`size_kv_cache`): the blocks every rank can hold (the smallest rank decides,
   capped by kv_cache_memory_bytes), and the longest sequence that then fits (max_model_len).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common.config import ConfigError
from ..common.messages import WorkerReady

CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache per rank on CPU when kv_cache_memory_bytes is not given"""
MIN_TOKEN_BUDGET = 2048
"""a step's token budget when max_num_batched_tokens is not given: max(max_model_len, this)"""
SERVE_TOKEN_BUDGET = 1024
"""`shardlm serve`'s step budget when max_num_batched_tokens is not given: short prefill chunks keep the
running streams' tokens flowing while prompts arrive (1 x H200, 8B, 128 streams of 512/128, async
scheduling: 5,591 output tok/s, TTFT p50 318 ms, inter-token p50/p99 19.9/37.6 ms against 4,476 / 729 /
9.4/60.7 with 2048; 2048 had beaten 8192 before async scheduling; docs/PERFORMANCE.md)"""


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def available_host_bytes() -> int | None:
    """Memory this machine can still give (Linux: MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(model: str, params: int, dtype: str, kv_bytes: int, available: int | None) -> None:
    """CPU workers: refuse, before any worker loads, a model whose weights and KV caches (all ranks share this
    machine) need more memory than the machine has available, naming both numbers and what to change."""
    need = params * DTYPE_BYTES[dtype] + kv_bytes
    if available is None or need <= available:
        return
    gib = 1 << 30
    raise ConfigError(f"{model} in {dtype} needs ~{need / gib:.1f} GiB on this machine ({params / 1e9:.2f}B parameters "
                      f"x {DTYPE_BYTES[dtype]} bytes + {kv_bytes / gib:.1f} GiB of KV cache) but {available / gib:.1f} "
                      f"GiB is available: use --dtype bfloat16, a smaller model, a smaller --kv-cache-memory-bytes, "
                      f"or GPUs")


MAX_STEP_TOKENS = 32768
"""the most tokens one step may run: the kernels index a step's [tokens, intermediate] activations in 32 bits
(a 262,144-token step of Llama-3-8B failed on an H200); longer prompts are prefilled in chunks"""


def token_budget(max_num_batched_tokens: int | None, max_model_len: int) -> int:
    """Tokens one step may run (prefill chunks + decodes)."""
    return max_num_batched_tokens or min(max(max_model_len, MIN_TOKEN_BUDGET), MAX_STEP_TOKENS)


@dataclass(frozen=True)
class WorkerBudget:
    cpu_kv_cache_bytes: int
    profile_tokens: int


def worker_budget(kv_cache_memory_bytes: int | None, max_num_batched_tokens: int | None,
                  max_model_len: int) -> WorkerBudget:
    return WorkerBudget(kv_cache_memory_bytes if kv_cache_memory_bytes is not None else CPU_KV_CACHE_BYTES,
                        token_budget(max_num_batched_tokens, max_model_len))


@dataclass(frozen=True)
class KVCacheSize:
    blocks: int
    """KV blocks per rank (the block manager's)"""
    capacity_tokens: int
    """tokens they hold"""
    max_model_len: int
    """longest prompt + output served"""


def size_kv_cache(ready: dict[int, WorkerReady], block_size: int, kv_cache_memory_bytes: int | None,
                  on_gpu: bool, max_model_len: int, max_model_len_given: bool) -> KVCacheSize:
    """The cache every rank can hold, from the workers' measurements; raises ConfigError, naming what to
    change, when it cannot hold a useful batch or the asked max_model_len."""
    blocks = min(r.blocks for r in ready.values())
    if kv_cache_memory_bytes is not None and on_gpu:
        blocks = min(blocks, kv_cache_memory_bytes // max(r.block_bytes for r in ready.values()))
    capacity = blocks * block_size
    if capacity < min(max_model_len, 16 * block_size) or blocks < 1:
        raise ConfigError(f"the KV cache holds only {capacity} tokens per rank after the weights; raise "
                          f"gpu_memory_utilization / kv_cache_memory_bytes, use more GPUs, or lower max_model_len")
    if not max_model_len_given:
        max_model_len = min(max_model_len, capacity)
    elif max_model_len > capacity:
        raise ConfigError(f"max_model_len={max_model_len} does not fit the KV cache ({capacity} tokens per rank); "
                          f"lower max_model_len or give the cache more memory")
    return KVCacheSize(blocks, capacity, max_model_len)
