"""EngineArgs: every engine setting, its default and its help, in one place (the CLI is built from it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.model_source import ModelSource


@dataclass
class EngineArgs:
    """Engine settings; names follow vLLM's where the meaning is the same."""

    model: str | ModelSource | None = None
    """built-in name, HF checkpoint folder, .gguf file or random:<preset> (default: smollm2-135m), or a
    ModelSource"""
    tensor_parallel_size: int = 1
    """TP degree: ranks that split every layer"""
    pipeline_parallel_size: int = 1
    """PP degree: stages that each hold a contiguous run of layers"""
    trace: str | None = None
    """write a Chrome/Perfetto trace (one track per rank: compute, communication, idle) here at shutdown"""
    max_batches_in_flight: int | None = None
    """pipeline micro-batches in flight at once (default: pipeline_parallel_size; 1 = no overlap)"""
    pp_layer_split: list[int] | None = None
    """layers per pipeline stage (e.g. [10, 14]); default balances weights incl. embedding and LM head"""
    dtype: str = "auto"
    """float32, bfloat16 or float16; auto = float32 on CPU, bfloat16 on GPU"""
    device: str = "auto"
    """cuda, cpu or auto (cuda when a GPU is visible)"""
    seed: int = 0
    """seed of random weights (random:<preset>)"""
    max_model_len: int | None = None
    """longest prompt + output; default: the model's context, capped by the KV cache"""
    max_num_seqs: int = 256
    """most sequences in one step"""
    max_num_batched_tokens: int | None = None
    """token budget of one step (prefill chunks + decodes); default max(max_model_len, 2048)"""
    block_size: int = 16
    """tokens per KV block"""
    gpu_memory_utilization: float = 0.9
    """fraction of each GPU's memory for weights, activations and KV cache"""
    kv_cache_memory_bytes: int | None = None
    """KV cache size per rank; overrides gpu_memory_utilization (default on CPU: 1 GiB)"""
    enforce_eager: bool = False
    """GPU: run every step eagerly; by default decode steps of dense models replay CUDA graphs"""
    max_seq_len_to_capture: int = 8192
    """GPU: decode steps whose longest context exceeds this run eagerly (graphs gather this many positions)"""
    external_workers: bool = False
    """wait for workers started by torchrun instead of spawning them"""
    driver_host: str = "127.0.0.1"
    """address the driver listens on for workers"""
    driver_port: int = 0
    """port the driver listens on (0: any free port)"""
    enable_prefix_caching: bool = True
    """share the KV blocks of identical prompt prefixes between requests"""
    first_device: int = 0
    """GPU index of rank 0 (a data-parallel replica's workers use GPUs first_device .. + tp - 1)"""
    enable_expert_parallel: bool = False
    """MoE: place whole experts on the TP ranks and dispatch tokens with all-to-all (off: every
    expert's FFN is split over the TP ranks like a dense MLP)"""
    expert_placement: str = "round_robin"
    """which EP rank holds which expert: round_robin, or balanced on a measured load (expert_load)"""
    expert_load: str | None = None
    """JSON file of tokens per expert per layer (LLM.save_expert_load) that balanced placement evens out"""
    num_redundant_experts: int = 0
    """balanced placement: extra copies of the hottest experts, spread over other ranks"""
